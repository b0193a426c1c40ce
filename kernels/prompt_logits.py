"""Triton kernels of the op ``prompt_logits``: a fused CLIP prompt-logit cross-entropy head.

Semantics: ``vlmfast/ops/prompt_logits.py`` (contract and torch reference). In float32, for image features
``x (N, D)`` and class text features ``w (C, D)`` (both unnormalized), the multiplier ``s``, labels ``y``:
``xn = x / max(||x||, 1e-12)``, ``wn = w / max(||w||, 1e-12)`` (F.normalize), ``cos = xn wn^T``, ``z = s cos``,
``lse = logsumexp_c z``, ``loss = (1 - eps)(lse - z_y) + eps (lse - mean_c z)`` (0 for ignored rows),
``conf = max_c softmax``, ``pred = argmax_c z`` (ties to the lowest index).

Design
------
* Forward: ONE kernel, grid ``cdiv(N, BLOCK_N)``, one program per row block. It walks the C tiles of
  ``BLOCK_C`` classes; for each, a loop over D chunks of ``BLOCK_D`` accumulates ``tl.dot(x_tile, w_tile^T)`` in
  float32 together with the sums of squares of the x rows and the w rows of the tile, so the normalization is
  fused: ``cos = acc * (1 / max(sqrt_rn(xss), 1e-12)) * (1 / max(sqrt_rn(wss), 1e-12))`` (IEEE sqrt/division;
  F.normalize's clamp; the product order differs from the reference by a few ulp). The w tile is loaded directly
  as ``(BLOCK_D, BLOCK_C)`` (no transpose). Per row, online: running max ``m`` and ``l = sum exp(z - m)``
  (rescaled by ``exp(m_old - m_new)`` when the max moves), the first argmax (lowest index of the tile max inside a
  tile, strict ``>`` across tiles so earlier tiles win ties), ``z_y`` and ``sum_c z``. The ``N x C`` logits are
  never written. ``lse = m + log(l)``, ``conf = 1 / l`` (= exp(m - lse), without the cancellation of m + log l - m).
  The x sums of squares are recomputed for every C tile (``BLOCK_N x BLOCK_D`` FMAs per step beside the
  ``BLOCK_N x BLOCK_C x BLOCK_D`` of the dot: negligible, and no extra pass over x).
* Backward: one kernel recomputes ``cos`` tile by tile (the same loops) from the saved ``lse`` and writes
  ``dz = g (exp(z - lse) - (1 - eps) onehot(y) - eps / C)`` (0 for ignored rows; float32, rows x C) plus one
  partial ``sum(dz * cos)`` per program (the scale's gradient; summed by torch: deterministic). Then torch:
  ``dxn = s dz wn``, ``dwn = s dz^T xn`` (two GEMMs, cuBLAS on a GPU) and the normalization backward
  ``dx = (dxn - xn <xn, dxn>) / ||x||`` (``dxn / 1e-12`` where ``||x|| < 1e-12``, as autograd of F.normalize).
  The launcher walks row chunks of at most ``BWD_CHUNK_ELEMS`` logits, so the ``dz`` buffer stays bounded
  (16 MiB) whatever N is.
* Dot precision: float32 inputs (either one): ``input_precision="ieee"`` (exact fp32 FMAs; on a GPU this runs
  on the FMA units, several times slower than tensor cores). Both inputs 16-bit (fp16/bf16, equal or mixed):
  the tiles are upcast to float32 before ``tl.dot`` (the interpreter's bf16 dot is garbage) and, on a GPU, the
  dot runs as TF32, which is exact here: every fp16/bf16 value is representable in TF32 (<= 11 significant bits,
  fp32 exponent range) and the products are accumulated in float32. Cost versus a native fp16/bf16 MMA: about
  2x tensor-core time plus the upcast in registers.
* Tiles (one config, no autotune): interpreter ``BLOCK_N = clamp(next_pow2(N), 16, 32)``, ``BLOCK_C =
  clamp(next_pow2(C), 16, 128)``, ``BLOCK_D = clamp(next_pow2(D), 16, 128)`` (each tile step costs milliseconds
  there). GPU: ``BLOCK_N`` 64, halved down to 16 while the row blocks do not give 2 programs per SM; ``BLOCK_C``
  up to 128, ``BLOCK_D`` up to 64 (32 for the fp32 FMA dot); 4 warps, 3 stages. Every tile dimension is >= 16
  (tl.dot's minimum on a GPU); rows, classes and features past the ends are masked (read as 0; padded classes are
  -inf in the max/sum-exp, 0 in the sums).

Limits
------
* float32/float16/bfloat16 inputs (x and w may differ); any N, C, D >= 1; any strides (passed to the kernel; row
  and class offsets in int64, feature offsets in int64 only when they could overflow int32).
* A row block is never split over C: N / BLOCK_N programs, so a small N (N / 16 << #SMs) under-fills the GPU.
* Non-finite inputs are not detected: a NaN/inf feature gives NaN statistics for its row (or its class: all rows).
* The forward reads the x row block once per C tile (C / BLOCK_C times, from L2 after the first) and w once per
  row block. The backward materializes ``dz`` per row chunk (float32) and runs the two GEMMs in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, next_power_of_2, num_sms

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_NORM_EPS = 1e-12  # F.normalize's clamp on the norm
BWD_CHUNK_ELEMS = 1 << 22  # dz logits per backward chunk (16 MiB of float32)
_MIN_TILE = 16  # tl.dot's smallest M, N, K on a GPU


@triton.jit
def _cos_tile(x_ptr, w_ptr, rows, rmask, c0, C, D, sxn, sxd, swc, swd, BLOCK_N: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, D_I64: tl.constexpr):
    """``(BLOCK_N, BLOCK_C)`` float32 cosines of the row block ``rows`` (int64) and the classes ``c0 + j``, with
    the class indices and their mask. The D loop accumulates the dot and both sums of squares; padding reads 0
    (so padded rows/classes get cos 0: a zero vector's clamped norm, never a NaN)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cols64 = cols.to(tl.int64)
    x_row = x_ptr + rows[:, None] * sxn  # (BLOCK_N, 1)
    w_col = w_ptr + cols64[None, :] * swc  # (1, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    xss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wss = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        if D_I64:
            d = d.to(tl.int64)
        xt = tl.load(x_row + d[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_col + d[:, None] * swd, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        xss += tl.sum(xt * xt, axis=1)
        wss += tl.sum(wt * wt, axis=0)
    one_n = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    one_c = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    inv_x = tl.math.div_rn(one_n, tl.maximum(tl.math.sqrt_rn(xss), 1e-12))
    inv_w = tl.math.div_rn(one_c, tl.maximum(tl.math.sqrt_rn(wss), 1e-12))
    cos = acc * inv_x[:, None] * inv_w[None, :]
    return cos, cols, cmask


@triton.jit
def _prompt_logits_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr,
    loss_ptr, lse_ptr, conf_ptr, pred_ptr,
    N, C, D,
    sxn, sxd, swc, swd,
    eps, one_minus_eps, inv_c,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, D_I64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    s = tl.load(scale_ptr).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    valid = rmask & (y != ignore_index) & (y >= 0) & (y < C)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pred = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cos, cols, cmask = _cos_tile(x_ptr, w_ptr, rows, rmask, c0, C, D, sxn, sxd, swc, swd, BLOCK_N, BLOCK_C,
                                     BLOCK_D, PRECISION, D_I64)
        z = cos * s
        zm = tl.where(cmask[None, :], z, float("-inf"))
        tmax = tl.max(zm, axis=1)
        # First index of the tile max (padding never matches: -inf < every finite max).
        first = tl.min(tl.where(zm == tmax[:, None], cols[None, :], 2147483647), axis=1)
        grows = tmax > m  # strict: earlier tiles win ties
        pred = tl.where(grows, first, pred)
        new_m = tl.maximum(m, tmax)
        l = l * tl.exp(m - new_m) + tl.sum(tl.exp(zm - new_m[:, None]), axis=1)  # exp(-inf) = 0 on the first tile
        m = new_m
        zsum += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    lse = m + tl.log(l)
    conf = tl.math.div_rn(tl.full((BLOCK_N,), 1.0, dtype=tl.float32), l)
    loss = one_minus_eps * (lse - zy) + eps * (lse - zsum * inv_c)
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(conf_ptr + rows, conf, mask=rmask)
    tl.store(pred_ptr + rows, pred.to(tl.int64), mask=rmask)


@triton.jit
def _prompt_logits_dz_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr, g_ptr, lse_ptr,
    dz_ptr, ds_part_ptr,
    N, C, D,
    sxn, sxd, swc, swd,
    one_minus_eps, eps_per_class,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, D_I64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    s = tl.load(scale_ptr).to(tl.float32)
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    valid = rmask & (y != ignore_index) & (y >= 0) & (y < C)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ds = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    dz_row = dz_ptr + rows[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        cos, cols, cmask = _cos_tile(x_ptr, w_ptr, rows, rmask, c0, C, D, sxn, sxd, swc, swd, BLOCK_N, BLOCK_C,
                                     BLOCK_D, PRECISION, D_I64)
        p = tl.exp(cos * s - lse[:, None])
        t = p - tl.where(cols[None, :] == y[:, None], one_minus_eps, 0.0) - eps_per_class
        m2 = valid[:, None] & cmask[None, :]
        dz = tl.where(m2, g[:, None] * t, 0.0)  # select, not multiply: an ignored row stays 0 whatever p is
        tl.store(dz_row + cols[None, :].to(tl.int64), dz, mask=rmask[:, None] & cmask[None, :])
        ds += dz * cos
    tl.store(ds_part_ptr + pid, tl.sum(tl.sum(ds, axis=1), axis=0))


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLogitsConfig:
    block_n: int
    block_c: int
    block_d: int
    precision: str  # tl.dot input_precision: "ieee" or "tf32"
    num_warps: int
    num_stages: int


def prompt_logits_config(N: int, C: int, D: int, x_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device,
                         interpret: bool | None = None, *, block_n: int | None = None, block_c: int | None = None,
                         block_d: int | None = None) -> PromptLogitsConfig:
    """Tile sizes from the shape (module docstring); keyword overrides (powers of two >= 16) are for tests."""
    if interpret is None:
        interpret = interpreting()
    low = x_dtype != torch.float32 and w_dtype != torch.float32
    precision = "tf32" if (low and not interpret) else "ieee"

    def clamp(v: int, hi: int) -> int:
        return max(_MIN_TILE, min(hi, next_power_of_2(v)))

    if interpret:
        bn, bc, bd = clamp(N, 32), clamp(C, 128), clamp(D, 128)
        warps, stages = 4, 1
    else:
        bn = clamp(N, 64)
        target = 2 * num_sms(device)
        while bn > _MIN_TILE and cdiv(N, bn) < target:
            bn //= 2
        bc = clamp(C, 128)
        bd = clamp(D, 64 if precision == "tf32" else 32)
        warps, stages = 4, 3
    if block_n is not None:
        bn = max(_MIN_TILE, next_power_of_2(block_n))
    if block_c is not None:
        bc = max(_MIN_TILE, next_power_of_2(block_c))
    if block_d is not None:
        bd = max(_MIN_TILE, next_power_of_2(block_d))
    return PromptLogitsConfig(bn, bc, bd, precision, warps, stages)


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    for name, t in (("x", x), ("w", w)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    N, D = (int(v) for v in x.shape)
    C = int(w.shape[0])
    if int(w.shape[1]) != D:
        raise ValueError(f"w: expected (C, {D}), got {tuple(w.shape)}")
    if N < 1 or C < 1 or D < 1:
        raise ValueError(f"expected N, C, D >= 1, got N = {N}, C = {C}, D = {D}")
    if scale.numel() != 1:
        raise ValueError(f"scale: expected one element, got shape {tuple(scale.shape)}")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels: expected ({N},), got {tuple(labels.shape)}")
    dev = x.device
    for name, t in (("w", w), ("scale", scale), ("labels", labels)):
        if t.device != dev:
            raise ValueError(f"{name}: expected on {dev}, got {t.device}")
    return N, C, D


def _strides(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int]:
    # Strides of size-1 dimensions are irrelevant (never multiplied by a non-zero index).
    sxn, sxd = (0 if size == 1 else st for size, st in zip(x.shape, x.stride()))
    swc, swd = (0 if size == 1 else st for size, st in zip(w.shape, w.stride()))
    return sxn, sxd, swc, swd


def _d_i64(D: int, block_d: int, sxd: int, swd: int) -> bool:
    return (D - 1 + block_d) * max(abs(sxd), abs(swd), 1) >= 2**31


def _scalar_args(scale: torch.Tensor, labels: torch.Tensor):
    s = scale.reshape(()).to(torch.float32)  # 0-d: read by the kernel, no host sync
    y = labels.to(torch.int64).contiguous()
    return s, y


def prompt_logits_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    *,
    block_n: int | None = None,
    block_c: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, conf, pred)``, each ``(N,)`` (float32; pred int64), of ``x (N, D)``, ``w (C, D)``, the 0-d
    multiplier ``scale``, ``labels (N,)``. ``loss`` is 0 for rows whose label is ``ignore_index`` or outside
    ``[0, C)``; lse/conf/pred are computed for every row. Keyword-only: tile overrides (tests only)."""
    N, C, D = _check(x, w, scale, labels)
    s, y = _scalar_args(scale, labels)
    eps = float(label_smoothing)
    dev = x.device
    cfg = prompt_logits_config(N, C, D, x.dtype, w.dtype, dev, block_n=block_n, block_c=block_c, block_d=block_d)
    sxn, sxd, swc, swd = _strides(x, w)
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty_like(loss)
    conf = torch.empty_like(loss)
    pred = torch.empty(N, dtype=torch.int64, device=dev)
    grid = (cdiv(N, cfg.block_n),)
    _prompt_logits_fwd_kernel[grid](
        x, w, s, y, loss, lse, conf, pred,
        N, C, D, sxn, sxd, swc, swd,
        eps, 1.0 - eps, 1.0 / C, int(ignore_index),
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, PRECISION=cfg.precision,
        D_I64=_d_i64(D, cfg.block_d, sxd, swd),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return loss, lse, conf, pred


def _normalized(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t / max(||t||, eps), max(||t||, eps), ||t|| < eps)`` in float32 (F.normalize)."""
    tf = t.float()
    raw = tf.norm(dim=-1)
    norm = raw.clamp_min(_NORM_EPS)
    return tf / norm.unsqueeze(-1), norm, raw < _NORM_EPS


def _normalize_backward(dn: torch.Tensor, tn: torch.Tensor, norm: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """Autograd of ``tn = t / clamp_min(||t||, eps)``: ``(dn - tn <tn, dn>) / ||t||``; ``dn / eps`` where clamped."""
    proj = dn - tn * (tn * dn).sum(dim=-1, keepdim=True)
    return torch.where(clamped.unsqueeze(-1), dn, proj) / norm.unsqueeze(-1)


def prompt_logits_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    *,
    block_n: int | None = None,
    block_c: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, dscale)``: the gradients of ``sum_n grad_n * loss_n`` (``grad (N,)``, float32) with respect to
    ``x`` (in x.dtype), ``w`` (in w.dtype) and the multiplier (0-d float32), given the forward's ``lse``."""
    N, C, D = _check(x, w, scale, labels)
    if tuple(grad.shape) != (N,) or tuple(lse.shape) != (N,):
        raise ValueError(f"grad/lse: expected ({N},), got {tuple(grad.shape)} / {tuple(lse.shape)}")
    s, y = _scalar_args(scale, labels)
    g = grad.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    eps = float(label_smoothing)
    dev = x.device
    cfg = prompt_logits_config(N, C, D, x.dtype, w.dtype, dev, block_n=block_n, block_c=block_c, block_d=block_d)
    sxn, sxd, swc, swd = _strides(x, w)
    d_i64 = _d_i64(D, cfg.block_d, sxd, swd)

    xn, xnorm, xclamped = _normalized(x)
    wn, wnorm, wclamped = _normalized(w)
    dxn = torch.empty(N, D, dtype=torch.float32, device=dev)
    dwn = torch.zeros(C, D, dtype=torch.float32, device=dev)
    # Row chunks: a multiple of BLOCK_N rows, at most BWD_CHUNK_ELEMS logits (at least one row block).
    step = max(cfg.block_n, (BWD_CHUNK_ELEMS // C) // cfg.block_n * cfg.block_n)
    step = min(step, cdiv(N, cfg.block_n) * cfg.block_n)
    dz_buf = torch.empty(min(step, N), C, dtype=torch.float32, device=dev)
    parts = []
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        n = r1 - r0
        dz = dz_buf[:n]
        grid = (cdiv(n, cfg.block_n),)
        part = torch.empty(grid[0], dtype=torch.float32, device=dev)
        _prompt_logits_dz_kernel[grid](
            x[r0:r1], w, s, y[r0:r1], g[r0:r1], lse[r0:r1], dz, part,
            n, C, D, sxn, sxd, swc, swd,
            1.0 - eps, eps / C, int(ignore_index),
            BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, PRECISION=cfg.precision, D_I64=d_i64,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        parts.append(part)
        torch.mm(dz, wn, out=dxn[r0:r1])
        dwn.addmm_(dz.t(), xn[r0:r1])
    dscale = torch.cat(parts).sum()
    dxn.mul_(s)
    dwn.mul_(s)
    dx = _normalize_backward(dxn, xn, xnorm, xclamped).to(x.dtype)
    dw = _normalize_backward(dwn, wn, wnorm, wclamped).to(w.dtype)
    return dx, dw, dscale
