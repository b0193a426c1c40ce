"""Triton kernels of the op ``region_loss`` (RaVL's region-aware loss): the two passes over the ``B x R x C``
similarities ``z[b, r, c] = inv_tau <rn[b, r], tn[c]>`` that the op module assembles into the loss.

Semantics: ``vlmfast/ops/region_loss.py`` (contract, shared assembly and torch reference). Inputs are what the loss
sees: ``rn (B, R, D)`` and ``tn (C, D)`` float32 (normalised by the caller when asked), ``rel``, ``spu (B, R)``
bool (disjoint: the caller applies "spurious wins"), ``present (C,)`` bool (the classes of the batch).

* :func:`region_loss_stats`: ``m[b, c] = max_{r: rel} z`` with ``am[b, c]`` the first such region (-inf / -1
  without a relevant region), ``sl[b, c] = logsumexp_{r: spu} z`` (-inf without a spurious region),
  ``smax[b, r] = max_{c: present} z`` with ``sarg[b, r]`` the first such class.
* :func:`region_loss_dsim`: ``dsim[b, r, c] = [r = am[b, c]] dm[b, c] + spu[b, r] (exp(min(z - za[c], 0)) ga[c]
  + [c = sarg[b, r]] dsmax[b, r])`` as a ``(B, R, C)`` float32 tensor (the op module scatters it into the regions
  and the text with two GEMMs).

Design
------
* Forward: ONE kernel, grid ``(cdiv(B, BLOCK_I), cdiv(C, BLOCK_C))``: a program owns a block of images and a
  tile of classes and walks the R regions in order; for each, ``tl.dot`` over D chunks of ``BLOCK_D`` gives the
  ``(BLOCK_I, BLOCK_C)`` similarity tile of region r of every image of the block (the text tile is loaded directly
  as ``(BLOCK_D, BLOCK_C)``: no transpose), fused with the masked running max (strict ``>`` in region order: the
  first region wins ties), an online max-subtracted LSE over the spurious regions, and the tile's best present
  class of each (image, r) with its first index. The best classes of the class tiles go to a ``(B, R, n_tiles)``
  buffer that torch merges (max, then the first tile on ties: lower classes win); no similarity is written.
* Backward: ONE kernel on the same grid recomputes the tiles and writes ``dsim``.
* Dot precision: float32 inputs, ``input_precision="ieee"`` (exact fp32 FMAs; the caller feeds float32 even for
  16-bit embeddings, since the normalised vectors are not 16-bit exact).
* Tiles (one config, no autotune): interpreter ``BLOCK_I = clamp(next_pow2(B), 16, 64)``, ``BLOCK_C =
  clamp(next_pow2(C), 16, 128)``, ``BLOCK_D = clamp(next_pow2(D), 16, 128)`` (each tile step costs milliseconds
  there). GPU: ``BLOCK_I`` 32 (16 while the image blocks do not give 2 programs per SM), ``BLOCK_C`` up to 64,
  ``BLOCK_D`` 32; 4 warps, 2 stages. Every tile dimension is >= 16 (tl.dot's minimum on a GPU); padding is masked
  (read as 0; padded images, regions and classes take part in no max, sum or store).

Limits
------
* float32 ``rn``/``tn`` (the launchers upcast anything else), any strides; B, R, C, D >= 1; image and class offsets
  in int64.
* Each program reads the text tile once per region and D chunk (from L2 after the first); a small B (B / 16 <<
  #SMs) under-fills the GPU. The GPU configuration is validated under the interpreter only (no device here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, next_power_of_2, num_sms

_MIN_TILE = 16  # tl.dot's smallest M, N, K on a GPU
_NO_INDEX = 2147483647


@triton.jit
def _sim_tile(r_ptr, t_ptr, imgs, imask, cols, cmask, r, D, srb, srr, srd, stc, std, inv_tau,
              BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(BLOCK_I, BLOCK_C)`` float32 tile of ``inv_tau <rn[imgs, r], tn[cols]>`` (0 where masked)."""
    acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
    x_row = r_ptr + imgs[:, None] * srb + r * srr
    t_col = t_ptr + cols[None, :] * stc
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        xt = tl.load(x_row + d[None, :] * srd, mask=imask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        tt = tl.load(t_col + d[:, None] * std, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xt, tt, acc, input_precision="ieee")
    return acc * inv_tau


@triton.jit
def _region_loss_fwd_kernel(
    r_ptr, t_ptr, rel_ptr, spu_ptr, pres_ptr,
    m_ptr, am_ptr, sl_ptr, smax_ptr, sarg_ptr,
    B, R, C, D, NCT, inv_tau,
    srb, srr, srd, stc, std,
    BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    imgs = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = imgs < B
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    pres = (tl.load(pres_ptr + cols, mask=cmask, other=0) != 0) & cmask
    m = tl.full((BLOCK_I, BLOCK_C), float("-inf"), dtype=tl.float32)
    am = tl.full((BLOCK_I, BLOCK_C), -1, dtype=tl.int32)
    smx = tl.full((BLOCK_I, BLOCK_C), float("-inf"), dtype=tl.float32)
    ssum = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
    for r in range(0, R):
        z = _sim_tile(r_ptr, t_ptr, imgs, imask, cols, cmask, r, D, srb, srr, srd, stc, std, inv_tau,
                      BLOCK_I, BLOCK_C, BLOCK_D)
        is_rel = tl.load(rel_ptr + imgs * R + r, mask=imask, other=0) != 0
        is_spu = tl.load(spu_ptr + imgs * R + r, mask=imask, other=0) != 0
        upd = is_rel[:, None] & cmask[None, :] & (z > m)  # strict: earlier regions win ties
        m = tl.where(upd, z, m)
        am = tl.where(upd, r, am)
        sp = is_spu[:, None] & cmask[None, :]
        new = tl.where(sp, tl.maximum(smx, z), 0.0)  # 0 off the spurious lanes: no -inf - -inf evaluated
        ssum = tl.where(sp, ssum * tl.exp(smx - new) + tl.exp(z - new), ssum)
        smx = tl.where(sp, new, smx)
        vm = tl.where(pres[None, :], z, float("-inf"))
        tmax = tl.max(vm, axis=1)
        first = tl.min(tl.where(pres[None, :] & (vm == tmax[:, None]), cols[None, :], _NO_INDEX), axis=1)
        out = (imgs * R + r) * NCT + pid_c
        tl.store(smax_ptr + out, tmax, mask=imask)
        tl.store(sarg_ptr + out, first.to(tl.int64), mask=imask)
    none = smx == float("-inf")
    sl = tl.where(none, float("-inf"), smx + tl.log(tl.where(none, 1.0, ssum)))
    offs = imgs[:, None] * C + cols[None, :]
    omask = imask[:, None] & cmask[None, :]
    tl.store(m_ptr + offs, m, mask=omask)
    tl.store(am_ptr + offs, am.to(tl.int64), mask=omask)
    tl.store(sl_ptr + offs, sl, mask=omask)


@triton.jit
def _region_loss_bwd_kernel(
    r_ptr, t_ptr, spu_ptr, am_ptr, dm_ptr, za_ptr, ga_ptr, sarg_ptr, dsmax_ptr, ds_ptr,
    B, R, C, D, inv_tau,
    srb, srr, srd, stc, std,
    BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    imgs = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = imgs < B
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs = imgs[:, None] * C + cols[None, :]
    omask = imask[:, None] & cmask[None, :]
    am = tl.load(am_ptr + offs, mask=omask, other=-1)
    dm = tl.load(dm_ptr + offs, mask=omask, other=0.0)
    za = tl.load(za_ptr + cols, mask=cmask, other=float("inf"))
    ga = tl.load(ga_ptr + cols, mask=cmask, other=0.0)
    for r in range(0, R):
        z = _sim_tile(r_ptr, t_ptr, imgs, imask, cols, cmask, r, D, srb, srr, srd, stc, std, inv_tau,
                      BLOCK_I, BLOCK_C, BLOCK_D)
        is_spu = tl.load(spu_ptr + imgs * R + r, mask=imask, other=0) != 0
        sk = tl.load(sarg_ptr + imgs * R + r, mask=imask, other=-1)
        dsm = tl.load(dsmax_ptr + imgs * R + r, mask=imask, other=0.0)
        e = tl.exp(tl.minimum(z - za[None, :], 0.0)) * ga[None, :]
        e = e + tl.where(cols[None, :] == sk[:, None], dsm[:, None], 0.0)
        d = tl.where(am == r, dm, 0.0) + tl.where(is_spu[:, None], e, 0.0)
        tl.store(ds_ptr + (imgs[:, None] * R + r) * C + cols[None, :], d, mask=omask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionLossConfig:
    block_i: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int


def region_loss_config(B: int, C: int, D: int, device: torch.device, interpret: bool | None = None, *,
                       block_i: int | None = None, block_c: int | None = None,
                       block_d: int | None = None) -> RegionLossConfig:
    """Tile sizes from the shape (module docstring); keyword overrides (powers of two >= 16) are for tests."""
    if interpret is None:
        interpret = interpreting()

    def clamp(v: int, hi: int) -> int:
        return max(_MIN_TILE, min(hi, next_power_of_2(v)))

    if interpret:
        bi, bc, bd, warps, stages = clamp(B, 64), clamp(C, 128), clamp(D, 128), 4, 1
    else:
        bi = clamp(B, 32)
        if bi > _MIN_TILE and cdiv(B, bi) < 2 * num_sms(device):
            bi = _MIN_TILE
        bc, bd, warps, stages = clamp(C, 64), clamp(D, 32), 4, 2
    bi = bi if block_i is None else max(_MIN_TILE, next_power_of_2(block_i))
    bc = bc if block_c is None else max(_MIN_TILE, next_power_of_2(block_c))
    bd = bd if block_d is None else max(_MIN_TILE, next_power_of_2(block_d))
    return RegionLossConfig(bi, bc, bd, warps, stages)


def _strides(rn: torch.Tensor, tn: torch.Tensor) -> tuple[int, ...]:
    # Strides of size-1 dimensions are irrelevant (never multiplied by a non-zero index).
    s_r = tuple(0 if n == 1 else s for n, s in zip(rn.shape, rn.stride()))
    s_t = tuple(0 if n == 1 else s for n, s in zip(tn.shape, tn.stride()))
    return s_r + s_t


def _check(rn: torch.Tensor, tn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int]:
    if rn.dim() != 3:
        raise ValueError(f"rn: expected shape (B, R, D), got {tuple(rn.shape)}")
    if tn.dim() != 2 or tn.shape[1] != rn.shape[2]:
        raise ValueError(f"tn: expected shape (C, {rn.shape[2]}), got {tuple(tn.shape)}")
    if tn.device != rn.device:
        raise ValueError(f"tn: expected on {rn.device}, got {tn.device}")
    B, R, D = (int(v) for v in rn.shape)
    C = int(tn.shape[0])
    if min(B, R, C, D) < 1:
        raise ValueError(f"expected B, R, C, D >= 1, got B={B}, R={R}, C={C}, D={D}")
    return rn.float(), tn.float(), B, R, C, D


def _flags(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int8).contiguous()


def region_loss_stats(rn: torch.Tensor, tn: torch.Tensor, rel: torch.Tensor, spu: torch.Tensor,
                      present: torch.Tensor, inv_tau: float, **tiles) -> tuple[torch.Tensor, ...]:
    """``(m (B, C), am (B, C) int64, sl (B, C), smax (B, R), sarg (B, R) int64)`` (module docstring). Keyword-only:
    tile overrides ``block_i``, ``block_c``, ``block_d``."""
    rn, tn, B, R, C, D = _check(rn, tn)
    dev = rn.device
    cfg = region_loss_config(B, C, D, dev, **tiles)
    nct = cdiv(C, cfg.block_c)
    m = torch.empty(B, C, dtype=torch.float32, device=dev)
    am = torch.empty(B, C, dtype=torch.int64, device=dev)
    sl = torch.empty(B, C, dtype=torch.float32, device=dev)
    smax_p = torch.empty(B, R, nct, dtype=torch.float32, device=dev)
    sarg_p = torch.empty(B, R, nct, dtype=torch.int64, device=dev)
    grid = (cdiv(B, cfg.block_i), nct)
    _region_loss_fwd_kernel[grid](
        rn, tn, _flags(rel), _flags(spu), _flags(present), m, am, sl, smax_p, sarg_p,
        B, R, C, D, nct, float(inv_tau), *_strides(rn, tn),
        BLOCK_I=cfg.block_i, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if nct == 1:
        return m, am, sl, smax_p.squeeze(2), sarg_p.squeeze(2)
    smax, tile = smax_p.max(dim=2)  # the first tile on ties: lower classes win
    return m, am, sl, smax, sarg_p.gather(2, tile.unsqueeze(2)).squeeze(2)


def region_loss_dsim(rn: torch.Tensor, tn: torch.Tensor, spu: torch.Tensor, am: torch.Tensor, dm: torch.Tensor,
                     za: torch.Tensor, ga: torch.Tensor, sarg: torch.Tensor, dsmax: torch.Tensor, inv_tau: float,
                     **tiles) -> torch.Tensor:
    """``dsim (B, R, C)`` float32 (module docstring). Keyword-only: tile overrides."""
    rn, tn, B, R, C, D = _check(rn, tn)
    dev = rn.device
    cfg = region_loss_config(B, C, D, dev, **tiles)
    ds = torch.empty(B, R, C, dtype=torch.float32, device=dev)
    grid = (cdiv(B, cfg.block_i), cdiv(C, cfg.block_c))
    _region_loss_bwd_kernel[grid](
        rn, tn, _flags(spu), am.to(torch.int64).contiguous(), dm.float().contiguous(), za.float().contiguous(),
        ga.float().contiguous(), sarg.to(torch.int64).contiguous(), dsmax.float().contiguous(), ds,
        B, R, C, D, float(inv_tau), *_strides(rn, tn),
        BLOCK_I=cfg.block_i, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ds
