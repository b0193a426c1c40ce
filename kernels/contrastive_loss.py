"""Triton kernels of the op ``contrastive_loss``: the symmetric CLIP contrastive (InfoNCE) loss on a B x B
similarity matrix that is never stored.

Semantics (everything float32): ALREADY L2-normalized features ``f (B, D)``, ``g (B, D)``, 0-d ``scale`` and
``bias``: ``z_ij = scale <f_i, g_j> + bias``. Optional teacher ``tf (B, Dt)``, ``tg (B, Dt)``, 0-d ``tscale``:
``zt_ij = tscale <tf_i, tg_j>`` (no bias). Three launchers:

* :func:`contrastive_lse`: ``lse_row[i] = logsumexp_j z_ij``, ``lse_col[j] = logsumexp_i z_ij``.
* :func:`contrastive_cross`: with ``pt_ij = exp(zt_ij - tlse_row[i])``, ``qt_ij = exp(zt_ij - tlse_col[j])``:
  ``x_row[i] = sum_j pt_ij z_ij``, ``x_col[j] = sum_i qt_ij z_ij`` (the teacher cross terms of a distillation).
* :func:`contrastive_grad`: ``D_ij = alpha (exp(z_ij - lse_row[i]) + exp(z_ij - lse_col[j]))
  - beta (exp(zt_ij - tlse_row[i]) + exp(zt_ij - tlse_col[j]))`` (the beta term only with a teacher), and
  ``df = scale D g``, ``dg = scale D^T f``, ``sum_dcos = sum_ij D_ij <f_i, g_j>``, ``sum_d = sum_ij D_ij``: the
  gradients of ``alpha (sum lse_row + sum lse_col) - beta (sum x_row + sum x_col)`` with respect to f, g, scale
  and bias (the label term ``-sum_i z_ii`` and any reduction weights are the caller's).

Design
------
* Tiles: ``_cos_tile`` computes a ``(BLOCK_M, BLOCK_N)`` float32 tile of ``<a_i, b_j>`` by a loop over D chunks
  of ``BLOCK_D`` (``tl.dot``, float32 accumulation); the b tile is loaded directly as ``(BLOCK_D, BLOCK_N)``.
  Every kernel has one program per row block that loops over all column blocks, recomputing the tiles; neither
  z nor D is ever written. Rows/columns/features past the ends are masked (read as 0); padded entries are
  ``-inf`` in maxima, 0 in sums (``tl.where``, never a multiply), and the exponentials of padded entries
  read an lse of ``+inf`` (exp = 0), so no padding can overflow or produce a NaN.
* ``contrastive_lse``: per row, an online max ``m`` and ``l = sum exp(z - m)`` (rescaled by ``exp(m_old - m_new)``
  when the max moves). Per (row block, column): the block's column max over its valid rows and the sum of
  ``exp(z - that max)``, stored into two ``(n_row_blocks, B)`` buffers; torch merges them (max over the blocks,
  then ``sum_b l_b exp(m_b - m)``). No fixed-max shortcut: at scale 100 with negative logits ``exp(z - scale)``
  underflows, the online maxima never do.
* ``contrastive_cross``: the same walk over the student and the teacher tile; row sums in registers, per-(row
  block, column) partial column sums into an ``(n_row_blocks, B)`` buffer summed by torch (deterministic).
* ``contrastive_grad``: ONE kernel ``_grad_kernel(a, b, ...)`` computing ``out_a = scale D_ab b``, launched twice:
  ``(a, b) = (f, g)`` gives df, and ``(a, b) = (g, f)`` with the lse vectors (and the teacher's) swapped gives
  dg (D is symmetric in the roles: the transposed tile is recomputed directly as ``<g_j, f_i>``, no transpose).
  Grid ``(n_row_blocks, cdiv(D, BLOCK_DO))``: a program owns a row block and a chunk of ``BLOCK_DO`` output
  features, keeps a ``(BLOCK_M, BLOCK_DO)`` float32 accumulator and, per column block, recomputes the D tile
  (full-D dot for z, and for zt) then accumulates ``tl.dot(D_tile, b[cols, chunk])``. When D > BLOCK_DO the D
  tile is re-derived once per output chunk (cost ``~ (D / BLOCK_DO + 1) / 2`` times the minimal GEMM work; none
  for D <= BLOCK_DO) in exchange for no global read-modify-write and no atomics: every output element has one
  writer. The first launch's chunk-0 programs also write per-row-block partials of ``sum D cos`` and ``sum D``,
  summed by torch (deterministic).
* Dot precision: a z/zt dot whose two inputs are both 16-bit (fp16/bf16, equal or mixed) upcasts the tiles to
  float32 (the interpreter's bf16 dot is garbage) and, on a GPU, runs as TF32, which is exact for fp16/bf16
  values (<= 11 significant bits) with float32 accumulation; a float32 input on either side uses
  ``input_precision="ieee"``. The output GEMM ``D_tile @ b`` multiplies float32 D values and always uses
  ``"ieee"`` (``ContrastiveConfig.out_precision``): exact float32, on a GPU the FMA units (slower than tensor
  cores; "tf32x3" would be the faster near-fp32 alternative, not enabled untested).
* Tiles (one config, no autotune): interpreter ``BLOCK_M = BLOCK_N = clamp(next_pow2(B), 16, 64)``,
  ``BLOCK_D = clamp(next_pow2(D), 16, 64)``, ``BLOCK_DO = clamp(next_pow2(D), 16, 128)`` (each tile step costs
  milliseconds there). GPU: ``BLOCK_M`` 64, halved down to 16 while the row blocks do not give 2 programs per SM,
  ``BLOCK_N`` 64, ``BLOCK_D`` 64, ``BLOCK_DO`` up to 128; 4 warps, 2 stages. Every tile dimension is >= 16
  (tl.dot's minimum on a GPU). Row, column and partial-buffer offsets are int64; feature offsets are int64 only
  when they could overflow int32.

Limits
------
* float32/float16/bfloat16 inputs (any mix, teacher included); any B, D, Dt >= 1; any strides (passed to the
  kernels). The features are assumed normalized; nothing checks it.
* scale, bias, tscale, alpha, beta are read in-kernel from 0-d float32 device tensors (no host sync); lse inputs
  must be finite (the forward's outputs are).
* Non-finite features are not detected: a NaN/inf feature gives NaN for its row and, through the column merges,
  for every column.
* Work: each row block reads all of g (B^2 D / BLOCK_M loads, from L2 after the first); a small B under-fills the
  GPU (B / 16 programs). The partial buffers hold ``n_row_blocks x B`` float32 (x2 for lse: 2 B^2 / BLOCK_M * 4
  bytes, e.g. 64 MiB each at B = 32768, BLOCK_M = 64). The GPU configuration has not been benchmarked or
  register-tuned on a device (validated under the interpreter only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import cdiv, interpreting, next_power_of_2, num_sms

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_MIN_TILE = 16  # tl.dot's smallest M, N, K on a GPU


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _cos_tile(a_ptr, b_ptr, rows, rmask, cols, cmask, D, sa0, sa1, sb0, sb1,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, D_I64: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` float32 tile of ``<a_i, b_j>`` for the int64 index vectors ``rows``/``cols``
    (padding reads 0, so padded entries are 0)."""
    a_row = a_ptr + rows[:, None] * sa0  # (BLOCK_M, 1)
    b_col = b_ptr + cols[None, :] * sb0  # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        if D_I64:
            d = d.to(tl.int64)
        at = tl.load(a_row + d[None, :] * sa1, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_col + d[:, None] * sb1, mask=dmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_kernel(
    f_ptr, g_ptr, scale_ptr, bias_ptr,
    lse_row_ptr, part_m_ptr, part_l_ptr,
    B, D,
    sf0, sf1, sg0, sg1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, D_I64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    s = tl.load(scale_ptr).to(tl.float32)
    bb = tl.load(bias_ptr).to(tl.float32)
    part_row = pid.to(tl.int64) * B
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, B, BLOCK_N):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < B
        cos = _cos_tile(f_ptr, g_ptr, rows, rmask, cols, cmask, D, sf0, sf1, sg0, sg1,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, D_I64)
        z = cos * s + bb
        # Rows: column 0 is valid in the first tile, so m is finite from then on (padded rows see z = bias).
        zr = tl.where(cmask[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(zr, axis=1))
        l = l * tl.exp(m - new_m) + tl.sum(tl.exp(zr - new_m[:, None]), axis=1)  # exp(-inf) = 0 on the first tile
        m = new_m
        # Columns: every row block has a valid row, so the column max is finite.
        zc = tl.where(rmask[:, None], z, float("-inf"))
        cmax = tl.max(zc, axis=0)
        csum = tl.sum(tl.exp(zc - cmax[None, :]), axis=0)
        tl.store(part_m_ptr + part_row + cols, cmax, mask=cmask)
        tl.store(part_l_ptr + part_row + cols, csum, mask=cmask)
    tl.store(lse_row_ptr + rows, m + tl.log(l), mask=rmask)


@triton.jit
def _cross_kernel(
    f_ptr, g_ptr, tf_ptr, tg_ptr, scale_ptr, bias_ptr, tscale_ptr, tlse_row_ptr, tlse_col_ptr,
    x_row_ptr, part_x_ptr,
    B, D, DT,
    sf0, sf1, sg0, sg1, stf0, stf1, stg0, stg1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, TPRECISION: tl.constexpr, D_I64: tl.constexpr, DT_I64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    s = tl.load(scale_ptr).to(tl.float32)
    bb = tl.load(bias_ptr).to(tl.float32)
    ts = tl.load(tscale_ptr).to(tl.float32)
    tlr = tl.load(tlse_row_ptr + rows, mask=rmask, other=float("inf"))
    part_row = pid.to(tl.int64) * B
    xr = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, B, BLOCK_N):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < B
        z = _cos_tile(f_ptr, g_ptr, rows, rmask, cols, cmask, D, sf0, sf1, sg0, sg1,
                      BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, D_I64) * s + bb
        zt = _cos_tile(tf_ptr, tg_ptr, rows, rmask, cols, cmask, DT, stf0, stf1, stg0, stg1,
                       BLOCK_M, BLOCK_N, BLOCK_D, TPRECISION, DT_I64) * ts
        tlc = tl.load(tlse_col_ptr + cols, mask=cmask, other=float("inf"))
        pt = tl.exp(zt - tlr[:, None])
        qt = tl.exp(zt - tlc[None, :])
        xr += tl.sum(tl.where(cmask[None, :], pt * z, 0.0), axis=1)
        xc = tl.sum(tl.where(rmask[:, None], qt * z, 0.0), axis=0)
        tl.store(part_x_ptr + part_row + cols, xc, mask=cmask)
    tl.store(x_row_ptr + rows, xr, mask=rmask)


@triton.jit
def _grad_kernel(
    a_ptr, b_ptr, ta_ptr, tb_ptr,
    scale_ptr, bias_ptr, tscale_ptr, alpha_ptr, beta_ptr,
    lse_a_ptr, lse_b_ptr, tlse_a_ptr, tlse_b_ptr,
    out_ptr, part_dcos_ptr, part_d_ptr,
    B, D, DT,
    sa0, sa1, sb0, sb1, sta0, sta1, stb0, stb1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, TPRECISION: tl.constexpr, OUT_PRECISION: tl.constexpr,
    TEACHER: tl.constexpr, PARTIALS: tl.constexpr, D_I64: tl.constexpr, DT_I64: tl.constexpr,
):
    """``out[rows, chunk] = scale * sum_j D_ij b[j, chunk]`` for a row block of ``a`` (float32, contiguous
    ``(B, D)`` output); with PARTIALS, chunk 0 also writes the row block's ``sum D cos`` and ``sum D``."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    s = tl.load(scale_ptr).to(tl.float32)
    bb = tl.load(bias_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    la = tl.load(lse_a_ptr + rows, mask=rmask, other=float("inf"))
    if TEACHER:
        ts = tl.load(tscale_ptr).to(tl.float32)
        beta = tl.load(beta_ptr).to(tl.float32)
        tla = tl.load(tlse_a_ptr + rows, mask=rmask, other=float("inf"))
    do = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    if D_I64:
        do = do.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    sdc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, B, BLOCK_N):
        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < B
        cos = _cos_tile(a_ptr, b_ptr, rows, rmask, cols, cmask, D, sa0, sa1, sb0, sb1,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, D_I64)
        z = cos * s + bb
        lb = tl.load(lse_b_ptr + cols, mask=cmask, other=float("inf"))
        dt = alpha * (tl.exp(z - la[:, None]) + tl.exp(z - lb[None, :]))
        if TEACHER:
            zt = _cos_tile(ta_ptr, tb_ptr, rows, rmask, cols, cmask, DT, sta0, sta1, stb0, stb1,
                           BLOCK_M, BLOCK_N, BLOCK_D, TPRECISION, DT_I64) * ts
            tlb = tl.load(tlse_b_ptr + cols, mask=cmask, other=float("inf"))
            dt -= beta * (tl.exp(zt - tla[:, None]) + tl.exp(zt - tlb[None, :]))
        dt = tl.where(rmask[:, None] & cmask[None, :], dt, 0.0)
        if PARTIALS:
            sdc += tl.sum(dt * cos, axis=1)
            sd += tl.sum(dt, axis=1)
        bt = tl.load(b_ptr + cols[:, None] * sb0 + do[None, :] * sb1, mask=cmask[:, None] & domask[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(dt, bt, acc, input_precision=OUT_PRECISION)
    tl.store(out_ptr + rows[:, None] * D + do[None, :], acc * s, mask=rmask[:, None] & domask[None, :])
    if PARTIALS:
        if pid_o == 0:
            tl.store(part_dcos_ptr + pid_m, tl.sum(sdc, axis=0))
            tl.store(part_d_ptr + pid_m, tl.sum(sd, axis=0))


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContrastiveConfig:
    block_m: int  # rows per program (power of two >= 16)
    block_n: int  # columns per tile step
    block_d: int  # features per step of the z / zt dots
    block_do: int  # output features per program of the gradient kernel
    precision: str  # tl.dot input_precision of the student z dot: "ieee" or "tf32"
    teacher_precision: str  # ... of the teacher zt dot
    out_precision: str  # ... of the gradient's D_tile @ b (float32 D values): "ieee"
    num_warps: int
    num_stages: int


def _precision(dtypes, interpret: bool) -> str:
    low = all(dt != torch.float32 for dt in dtypes)
    return "tf32" if (low and not interpret) else "ieee"


def contrastive_config(B: int, D: int, dtypes: tuple[torch.dtype, ...], device: torch.device,
                       teacher_dtypes: tuple[torch.dtype, ...] | None = None, interpret: bool | None = None, *,
                       block_m: int | None = None, block_n: int | None = None, block_d: int | None = None,
                       block_do: int | None = None) -> ContrastiveConfig:
    """Tile sizes from the shape (module docstring); keyword overrides (rounded up to powers of two >= 16) are
    for tests. ``dtypes`` are the student features' dtypes, ``teacher_dtypes`` the teacher's (None: no teacher)."""
    if interpret is None:
        interpret = interpreting()

    def clamp(v: int, hi: int) -> int:
        return max(_MIN_TILE, min(hi, next_power_of_2(v)))

    if interpret:
        bm = bn = clamp(B, 64)
        bd = clamp(D, 64)
        bdo = clamp(D, 128)
        warps, stages = 4, 1
    else:
        bm = clamp(B, 64)
        target = 2 * num_sms(device)
        while bm > _MIN_TILE and cdiv(B, bm) < target:
            bm //= 2
        bn = clamp(B, 64)
        bd = clamp(D, 64)
        bdo = clamp(D, 128)
        warps, stages = 4, 2

    def override(v: int | None, default: int) -> int:
        return default if v is None else max(_MIN_TILE, next_power_of_2(v))

    return ContrastiveConfig(
        block_m=override(block_m, bm), block_n=override(block_n, bn), block_d=override(block_d, bd),
        block_do=override(block_do, bdo),
        precision=_precision(dtypes, interpret),
        teacher_precision=_precision(teacher_dtypes, interpret) if teacher_dtypes else "ieee",
        out_precision="ieee", num_warps=warps, num_stages=stages,
    )


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], B: int | None = None) -> tuple[int, int]:
    for name, t in zip(names, (a, b)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    n, d = (int(v) for v in a.shape)
    if tuple(b.shape) != (n, d):
        raise ValueError(f"{names[1]}: expected {(n, d)} like {names[0]}, got {tuple(b.shape)}")
    if B is not None and n != B:
        raise ValueError(f"{names[0]}: expected {B} rows, got {n}")
    if n < 1 or d < 1:
        raise ValueError(f"expected B, D >= 1, got B = {n}, D = {d}")
    if b.device != a.device:
        raise ValueError(f"{names[1]}: expected on {a.device}, got {b.device}")
    return n, d


def _scalar(t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{name}: expected a one-element tensor")
    if t.device != device:
        raise ValueError(f"{name}: expected on {device}, got {t.device}")
    return t.reshape(()).to(torch.float32)  # 0-d: read by the kernel, no host sync


def _vector(t: torch.Tensor, name: str, B: int, device: torch.device) -> torch.Tensor:
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name}: expected ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected on {device}, got {t.device}")
    return t.to(torch.float32).contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int]:
    # Strides of size-1 dimensions are irrelevant (never multiplied by a non-zero index).
    return tuple(0 if size == 1 else st for size, st in zip(t.shape, t.stride()))


def _d_i64(D: int, block: int, *strides: int) -> bool:
    return (D - 1 + block) * max([abs(s) for s in strides] + [1]) >= 2**31


def contrastive_lse(
    f: torch.Tensor,
    g: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_row, lse_col)``, each ``(B,)`` float32: the row and column logsumexp of
    ``z = scale f g^T + bias`` (``f``, ``g`` (B, D); 0-d ``scale``, ``bias``). Keyword-only: tile overrides."""
    B, D = _check_pair(f, g, ("f", "g"))
    dev = f.device
    s, b0 = _scalar(scale, "scale", dev), _scalar(bias, "bias", dev)
    cfg = contrastive_config(B, D, (f.dtype, g.dtype), dev, block_m=block_m, block_n=block_n, block_d=block_d)
    (sf0, sf1), (sg0, sg1) = _strides(f), _strides(g)
    n_rb = cdiv(B, cfg.block_m)
    lse_row = torch.empty(B, dtype=torch.float32, device=dev)
    part_m = torch.empty(n_rb, B, dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    _lse_kernel[(n_rb,)](
        f, g, s, b0, lse_row, part_m, part_l,
        B, D, sf0, sf1, sg0, sg1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, PRECISION=cfg.precision,
        D_I64=_d_i64(D, cfg.block_d, sf1, sg1),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m = part_m.amax(dim=0)  # finite: every row block has a valid row
    lse_col = m + (part_l * torch.exp(part_m - m)).sum(dim=0).log()
    return lse_row, lse_col


def contrastive_cross(
    f: torch.Tensor,
    g: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    tf: torch.Tensor,
    tg: torch.Tensor,
    tscale: torch.Tensor,
    tlse_row: torch.Tensor,
    tlse_col: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_row, x_col)``, each ``(B,)`` float32: ``x_row[i] = sum_j exp(zt_ij - tlse_row[i]) z_ij`` and
    ``x_col[j] = sum_i exp(zt_ij - tlse_col[j]) z_ij`` with ``z = scale f g^T + bias``, ``zt = tscale tf tg^T``
    (``tf``, ``tg`` (B, Dt); ``tlse_*`` the teacher's logsumexps). Keyword-only: tile overrides."""
    B, D = _check_pair(f, g, ("f", "g"))
    _, DT = _check_pair(tf, tg, ("tf", "tg"), B)
    dev = f.device
    if tf.device != dev:
        raise ValueError(f"tf: expected on {dev}, got {tf.device}")
    s, b0, ts = _scalar(scale, "scale", dev), _scalar(bias, "bias", dev), _scalar(tscale, "tscale", dev)
    tlr, tlc = _vector(tlse_row, "tlse_row", B, dev), _vector(tlse_col, "tlse_col", B, dev)
    cfg = contrastive_config(B, max(D, DT), (f.dtype, g.dtype), dev, (tf.dtype, tg.dtype),
                             block_m=block_m, block_n=block_n, block_d=block_d)
    (sf0, sf1), (sg0, sg1) = _strides(f), _strides(g)
    (stf0, stf1), (stg0, stg1) = _strides(tf), _strides(tg)
    n_rb = cdiv(B, cfg.block_m)
    x_row = torch.empty(B, dtype=torch.float32, device=dev)
    part_x = torch.empty(n_rb, B, dtype=torch.float32, device=dev)
    _cross_kernel[(n_rb,)](
        f, g, tf, tg, s, b0, ts, tlr, tlc, x_row, part_x,
        B, D, DT, sf0, sf1, sg0, sg1, stf0, stf1, stg0, stg1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        PRECISION=cfg.precision, TPRECISION=cfg.teacher_precision,
        D_I64=_d_i64(D, cfg.block_d, sf1, sg1), DT_I64=_d_i64(DT, cfg.block_d, stf1, stg1),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return x_row, part_x.sum(dim=0)


def contrastive_grad(
    f: torch.Tensor,
    g: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    tf: torch.Tensor | None = None,
    tg: torch.Tensor | None = None,
    tscale: torch.Tensor | None = None,
    tlse_row: torch.Tensor | None = None,
    tlse_col: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    block_do: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(df (B, D), dg (B, D), sum_dcos (), sum_d ())``, all float32, for
    ``D_ij = alpha (exp(z_ij - lse_row[i]) + exp(z_ij - lse_col[j]))
    - beta (exp(zt_ij - tlse_row[i]) + exp(zt_ij - tlse_col[j]))`` (the beta term only with a teacher: pass all of
    tf, tg, tscale, tlse_row, tlse_col or none): ``df = scale D g``, ``dg = scale D^T f``,
    ``sum_dcos = sum D_ij <f_i, g_j>``, ``sum_d = sum D_ij``. Keyword-only: tile overrides (tests only)."""
    B, D = _check_pair(f, g, ("f", "g"))
    dev = f.device
    s, b0 = _scalar(scale, "scale", dev), _scalar(bias, "bias", dev)
    a_, b_ = _scalar(alpha, "alpha", dev), _scalar(beta, "beta", dev)
    lr, lc = _vector(lse_row, "lse_row", B, dev), _vector(lse_col, "lse_col", B, dev)
    teacher_args = (tf, tg, tscale, tlse_row, tlse_col)
    n_given = sum(t is not None for t in teacher_args)
    if n_given not in (0, len(teacher_args)):
        raise ValueError("teacher: pass all of tf, tg, tscale, tlse_row, tlse_col, or none")
    teacher = n_given > 0
    if teacher:
        _, DT = _check_pair(tf, tg, ("tf", "tg"), B)
        if tf.device != dev:
            raise ValueError(f"tf: expected on {dev}, got {tf.device}")
        ts = _scalar(tscale, "tscale", dev)
        tlr, tlc = _vector(tlse_row, "tlse_row", B, dev), _vector(tlse_col, "tlse_col", B, dev)
        tdtypes = (tf.dtype, tg.dtype)
    else:  # placeholders, never read (TEACHER=False)
        DT, tf, tg, ts, tlr, tlc, tdtypes = 1, f, g, s, lr, lc, None
    cfg = contrastive_config(B, D, (f.dtype, g.dtype), dev, tdtypes, block_m=block_m, block_n=block_n,
                             block_d=block_d, block_do=block_do)
    (sf0, sf1), (sg0, sg1) = _strides(f), _strides(g)
    (stf0, stf1), (stg0, stg1) = _strides(tf), _strides(tg)
    d_i64 = _d_i64(D, max(cfg.block_d, cfg.block_do), sf1, sg1, D)
    dt_i64 = _d_i64(DT, cfg.block_d, stf1, stg1) if teacher else False
    n_rb = cdiv(B, cfg.block_m)
    grid = (n_rb, cdiv(D, cfg.block_do))
    df = torch.empty(B, D, dtype=torch.float32, device=dev)
    dg = torch.empty_like(df)
    part_dcos = torch.empty(n_rb, dtype=torch.float32, device=dev)
    part_d = torch.empty_like(part_dcos)
    common = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
        PRECISION=cfg.precision, TPRECISION=cfg.teacher_precision, OUT_PRECISION=cfg.out_precision,
        TEACHER=teacher, D_I64=d_i64, DT_I64=dt_i64, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # df: rows of f against columns of g.
    _grad_kernel[grid](
        f, g, tf, tg, s, b0, ts, a_, b_, lr, lc, tlr, tlc, df, part_dcos, part_d,
        B, D, DT, sf0, sf1, sg0, sg1, stf0, stf1, stg0, stg1,
        PARTIALS=True, **common,
    )
    # dg: the transposed problem (rows of g against columns of f, the row/column lse swapped).
    _grad_kernel[grid](
        g, f, tg, tf, s, b0, ts, a_, b_, lc, lr, tlc, tlr, dg, part_dcos, part_d,
        B, D, DT, sg0, sg1, sf0, sf1, stg0, stg1, stf0, stf1,
        PARTIALS=False, **common,
    )
    return df, dg, part_dcos.sum(), part_d.sum()
