"""Triton kernel of the op ``kmeans_assign``: nearest centroid per point, without an ``N x k`` score matrix.

Semantics: ``vlmfast/ops/kmeans_assign.py`` (contract and torch reference). In float32, for points ``x (N, d)``
and centroids ``c (k, d)``: ``z_ij = <x_i, c_j>``; metric ip: ``v_ij = z_ij``; metric l2: ``v_ij = 2 z_ij -
||c_j||^2``; ``label_i`` = the first index of ``max_j v_ij`` over the non-NaN ``v_ij`` (-1 when all are NaN);
``score_i = max_j v_ij`` (ip) or ``max(||x_i||^2 - max_j v_ij, 0)`` (l2; NaN for label -1).

Design
------
* ONE kernel, grid ``cdiv(N, BLOCK_N)``, one program per row block. It walks the centroid tiles of ``BLOCK_K``
  centroids; for each, a loop over d chunks of ``BLOCK_D`` accumulates ``tl.dot(x_tile, c_tile^T)`` in float32
  (the centroid tile is loaded directly as ``(BLOCK_D, BLOCK_K)``: no transpose) and, for l2, ``||x||^2`` of the
  row block (recomputed per centroid tile: ``BLOCK_N x BLOCK_D`` FMAs beside the dot's ``x BLOCK_K``). Per row,
  online: the tile's max over its non-NaN, in-range entries, the first column reaching it, and a strict ``>``
  against the running best, so earlier tiles win ties (the first index overall). No score matrix is written.
* ``||c||^2`` (l2) is a ``(k,)`` float32 vector from the caller (the op module's one definition).
* Sums and counts are NOT computed here: the op module runs a float64 ``index_add_`` over the labels afterwards
  (one read of x; atomics on a GPU).
* Dot precision: float32 inputs (either one): ``input_precision="ieee"`` (exact fp32 FMAs: the labels then agree
  with a float32 GEMM up to summation order). Both 16-bit: the tiles are upcast to float32 before ``tl.dot`` (the
  interpreter's bf16 dot is garbage) and the dot runs as TF32 on a GPU, exact for fp16/bf16 values (<= 11
  significant bits) with float32 accumulation.
* Tiles (one config, no autotune): interpreter ``BLOCK_N = clamp(next_pow2(N), 16, 128)``, ``BLOCK_K =
  clamp(next_pow2(k), 16, 128)``, ``BLOCK_D = clamp(next_pow2(d), 16, 128)`` (each tile step costs
  milliseconds there). GPU: ``BLOCK_N`` 128 (64 for the fp32 FMA dot), halved down to 16 while the row blocks
  do not give 2 programs per SM; ``BLOCK_K`` up to 128; ``BLOCK_D`` up to 64 (32 for fp32); 8 warps for 128-row
  blocks, else 4; 3 stages. Every tile dimension is >= 16 (tl.dot's minimum on a GPU); padding is masked (read as
  0, padded centroids excluded from the max).

Limits
------
* float32/float16/bfloat16 inputs (x and c may differ); N >= 0, k in [1, 2^31 - 1), d >= 1; any strides (row and
  centroid offsets in int64, feature offsets in int64 only when they could overflow int32).
* A row block is never split over k: a small N (N / 16 << #SMs) under-fills the GPU.
* x is read once per centroid tile (k / BLOCK_K times, from L2 after the first), the centroids once per row block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, next_power_of_2, num_sms

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_MIN_TILE = 16  # tl.dot's smallest M, N, K on a GPU
_NO_INDEX = 2147483647


@triton.jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, cc_ptr, labels_ptr, scores_ptr,
    N, K, D,
    sxn, sxd, sck, scd,
    L2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, D_I64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    x_row = x_ptr + rows[:, None] * sxn  # (BLOCK_N, 1)
    best = tl.full((BLOCK_N,), -1, dtype=tl.int32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    xss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        c_col = c_ptr + cols.to(tl.int64)[None, :] * sck  # (1, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        xs = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            if D_I64:
                d = d.to(tl.int64)
            xt = tl.load(x_row + d[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            ct = tl.load(c_col + d[:, None] * scd, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
            if L2:
                xs += tl.sum(xt * xt, axis=1)
        if L2:
            cc = tl.load(cc_ptr + cols, mask=cmask, other=0.0)
            v = acc * 2.0 - cc[None, :]
            xss = xs
        else:
            v = acc
        valid = cmask[None, :] & (v == v)  # in range and not NaN
        vm = tl.where(valid, v, float("-inf"))
        tmax = tl.max(vm, axis=1)
        first = tl.min(tl.where(valid & (vm == tmax[:, None]), cols[None, :], _NO_INDEX), axis=1)
        upd = (first != _NO_INDEX) & ((tmax > m) | (best < 0))  # strict: earlier tiles win ties
        best = tl.where(upd, first, best)
        m = tl.where(upd, tmax, m)
    if L2:
        s = xss - m
        score = tl.where(s < 0.0, 0.0, s)  # NaN stays NaN
    else:
        score = m
    score = tl.where(best >= 0, score, float("nan"))
    tl.store(labels_ptr + rows, best.to(tl.int64), mask=rmask)
    tl.store(scores_ptr + rows, score, mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansAssignConfig:
    block_n: int
    block_k: int
    block_d: int
    precision: str  # tl.dot input_precision: "ieee" or "tf32"
    num_warps: int
    num_stages: int


def kmeans_assign_config(N: int, K: int, D: int, x_dtype: torch.dtype, c_dtype: torch.dtype, device: torch.device,
                         interpret: bool | None = None, *, block_n: int | None = None, block_k: int | None = None,
                         block_d: int | None = None) -> KMeansAssignConfig:
    """Tile sizes from the shape (module docstring); keyword overrides (powers of two >= 16) are for tests."""
    if interpret is None:
        interpret = interpreting()
    low = x_dtype != torch.float32 and c_dtype != torch.float32
    precision = "tf32" if (low and not interpret) else "ieee"

    def clamp(v: int, hi: int) -> int:
        return max(_MIN_TILE, min(hi, next_power_of_2(v)))

    if interpret:
        bn, bk, bd = clamp(N, 128), clamp(K, 128), clamp(D, 128)
        warps, stages = 4, 1
    else:
        bn = clamp(N, 128 if precision == "tf32" else 64)
        target = 2 * num_sms(device)
        while bn > _MIN_TILE and cdiv(N, bn) < target:
            bn //= 2
        bk = clamp(K, 128)
        bd = clamp(D, 64 if precision == "tf32" else 32)
        warps, stages = (8 if bn >= 128 else 4), 3
    if block_n is not None:
        bn = max(_MIN_TILE, next_power_of_2(block_n))
    if block_k is not None:
        bk = max(_MIN_TILE, next_power_of_2(block_k))
    if block_d is not None:
        bd = max(_MIN_TILE, next_power_of_2(block_d))
    return KMeansAssignConfig(bn, bk, bd, precision, warps, stages)


def _check(x: torch.Tensor, c: torch.Tensor, cc: torch.Tensor | None, l2: bool) -> tuple[int, int, int]:
    for name, t in (("x", x), ("centroids", c)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    N, D = (int(v) for v in x.shape)
    K = int(c.shape[0])
    if int(c.shape[1]) != D:
        raise ValueError(f"centroids: expected (k, {D}), got {tuple(c.shape)}")
    if K < 1 or D < 1 or K >= _NO_INDEX:
        raise ValueError(f"expected 1 <= k < 2^31 and d >= 1, got k = {K}, d = {D}")
    if c.device != x.device:
        raise ValueError(f"centroids: expected on {x.device}, got {c.device}")
    if l2 and cc is not None and (tuple(cc.shape) != (K,) or cc.device != x.device):
        raise ValueError(f"cc: expected ({K},) on {x.device}, got {tuple(cc.shape)} on {cc.device}")
    return N, K, D


def kmeans_assign_forward(
    x: torch.Tensor,
    centroids: torch.Tensor,
    l2: bool,
    cc: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels (N,) int64, scores (N,) float32)`` of ``x (N, d)`` against ``centroids (k, d)``; metric l2 when
    ``l2`` (``cc`` = ``||c_j||^2`` float32, computed here when None), else ip. Keyword-only: tile overrides."""
    N, K, D = _check(x, centroids, cc, l2)
    dev = x.device
    labels = torch.empty(N, dtype=torch.int64, device=dev)
    scores = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return labels, scores
    if l2:
        if cc is None:
            cf = centroids.float()
            cc = (cf * cf).sum(dim=1)
        cc = cc.to(torch.float32).contiguous()
    else:
        cc = scores  # never read (L2 is a constexpr False)
    cfg = kmeans_assign_config(N, K, D, x.dtype, centroids.dtype, dev, block_n=block_n, block_k=block_k,
                               block_d=block_d)
    # Strides of size-1 dimensions are irrelevant (never multiplied by a non-zero index).
    sxn, sxd = (0 if size == 1 else st for size, st in zip(x.shape, x.stride()))
    sck, scd = (0 if size == 1 else st for size, st in zip(centroids.shape, centroids.stride()))
    d_i64 = (D - 1 + cfg.block_d) * max(abs(sxd), abs(scd), 1) >= 2**31
    grid = (cdiv(N, cfg.block_n),)
    _kmeans_assign_kernel[grid](
        x, centroids, cc, labels, scores,
        N, K, D, sxn, sxd, sck, scd,
        L2=bool(l2), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, PRECISION=cfg.precision,
        D_I64=d_i64, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return labels, scores
