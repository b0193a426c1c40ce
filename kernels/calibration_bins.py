"""Triton kernel of the op ``calibration_bins``.

Semantics: ``vlmfast/ops/calibration_bins.py`` (torch reference) and ``csrc/calibration_bins.h`` (same contract).

Design
------
* Grid: 1-D, ``M * P`` programs. Program ``pid`` serves model ``m = pid // P`` and walks the row tiles
  ``j, j + P, j + 2P, ...`` (``j = pid % P``) of that model: a persistent, grid-strided loop, so per-program
  accumulators reach global memory once per program, not once per tile. The next row tile (and its labels) is
  prefetched into registers before the current one is reduced (Triton does not pipeline these loads itself).
* Tile: ``BLOCK_N`` rows x ``BLOCK_C = R * W`` classes, held as a 4-D block ``(R, BLOCK_N, L, V)``: class
  ``c0 + q * W + l * V + v`` of row ``n``, ``W = L * V``. ``V`` is one 16-byte vector per thread (8 bf16/fp16,
  4 fp32) and ``L`` lanes share a row (32 for C >= 256 bf16 / 128 fp32), so a warp reads W contiguous classes
  of one row per segment (coalesced ``LDG.128`` when stride_c == 1 and the row strides / C are multiples of the
  vector, which the launcher proves and passes as ``ROW_ALIGN`` / ``C_ALIGN``); each thread holds R vectors of
  its row. Row reductions run over the in-thread axes (V, R) first, then one shuffle tree over L: never shared
  memory. bf16 with even C/row strides is read as int32 words (``PAIRS``): bf16 -> f32 is then one shift or mask
  per class. Any strides work (int64 row addressing; non-unit stride_c is correct, merely uncoalesced).
* Row statistics in float32. C <= BLOCK_C (``SINGLE_TILE``, e.g. C = 1000 with BLOCK_C = 1024): one tile per row.
  Otherwise an online loop over column tiles keeps a running max ``mx`` and a running first argmax ``pred``
  (lowest index inside a tile: per-thread minimum of slot constants + the lane offset, then over lanes; strict
  ``>`` across tiles, so earlier tiles win ties), so the (M, N, C) probabilities are never written.
  The sums leave the argmax out: ``rest = sum_{c != pred} exp(x_c - mx)`` (``rest2`` of the squares), and
  ``s = 1 + rest`` only at the end. Added to the sums, the argmax's exact 1 would round away the small terms of a
  near-saturated row (top logit ~17-20 above C >= 10 others: each term below half an ulp of 1), giving conf ==
  1.0 where an accurately summed softmax (float64, say) does not. When the max moves, the old max's 1
  joins the rest: ``rest = (rest + 1) * alpha``, ``alpha = exp(mx_old - mx_new)`` (``alpha^2`` for ``rest2``).
  Per class: convert, ``x + 0*x``, pad select, max, first-index (eq/select/min), exp (sub, mul, ex2), the
  argmax drop (compare, select), 2 sums.
* Non-finite logits: ``x + 0 * x`` is ``x`` for finite ``x`` and NaN for NaN/+-inf, so a non-finite row ends
  with a NaN ``rest`` (no extra reduction; the dropped argmax is never the NaN); such a row is excluded with
  ``tl.where`` everywhere (never by multiplication) and counted in ``nonfinite``. Its garbage never leaves its
  own row.
* Bins: ``b = int(float64(conf) * n_bins)`` clamped to [0, n_bins] (conf > 0, so truncation = floor); slot
  ``n_bins`` is conf == 1.0. ``BINS_MODE`` (chosen in ``_utils.calibration_bins_config``):
  1 (NB_PAD = next_pow2(n_bins + 1) <= 128, rows spread over >= NB_PAD / 4 lanes: large C): per-row-slot
  register accumulators (BLOCK_N, NB_PAD) with the bin axis along the row's lanes, one cell per thread for
  NB_PAD <= 32: int32 count/correct, float64 conf; no cross-warp traffic per tile; summed over rows at the end;
  2 (NB_PAD <= 128, small C: many rows per tile): one-hot (NB_PAD, BLOCK_N) reduced over the tile's rows into
  (NB_PAD,) registers each tile (count and correct packed in one int32);
  0 (NB_PAD > 128): three relaxed global atomics per row (many bins: little contention).
  Modes 1/2 flush with at most 3 * (n_bins + 1) relaxed atomics per program (empty bins skipped). NLL/Brier:
  float64 per-row-slot sums, one atomic each per program; the non-finite count likewise.
* Per-sample outputs (optional): float32 confidence and uint8 (bool) correctness; 0 / False for non-finite rows
  (as the C++ kernel; the torch reference writes the confidence of the zeroed row, 1/C, there).
* Launch (GPU): 8 warps, ``maxnreg`` 128 (two CTAs per SM; the default tiles need ~120 registers, ptxas would
  otherwise take ~170 and fit one), ``num_stages`` 1. Target shape (bf16, C = 1000): BLOCK_N = 8 (one row per
  warp), R = 4, W = 256: 32 classes = 4 x 16 B per thread and 16 KiB per tile; sm_90 SASS: ~17 instructions
  per class including the per-row epilogue, no spills, no shared memory or barriers per tile without samples.

Limits
------
* float32/float16/bfloat16 logits only (no float64), n_bins <= 1024 (checked by the dispatcher), N < 2**31.
* int64/float64 ``tl.atomic_add`` (relaxed): float sums are not bitwise deterministic run to run (atomic order);
  counts are exact.
* A row is never split across programs: very few rows with a huge C (M * N / BLOCK_N << #SMs) under-fill the GPU.
* Row strides that are not a multiple of the 16-byte vector (e.g. bf16 with odd C, or a strided class axis)
  fall back to narrower or scalar loads: correct, several times more load instructions.
* Accuracy: on the GPU exp/log are ``ex2.approx.ftz`` / ``lg2.approx.ftz`` (inline PTX; ``tl.exp``/``tl.log``
  under the interpreter, which cannot run PTX): exp(0) == 1 exactly and 1/s is an IEEE division, so conf == 1.0
  exactly when 1 + rest rounds to 1 in float32 (saturated softmax), as in an accurately summed softmax. NLL per
  row is ``(mx - x_y) + log1p(rest)``, the difference in float64 (no overflow for finite logits such as
  +-3e38), log1p from a short series for rest < 1/64 (so a near-saturated row keeps its digits despite
  ``lg2.approx``) and from the log otherwise; Brier is ``((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2``,
  i.e. ``(rest^2 + rest2) / s^2`` when the label is the prediction (no cancellation). The online rescaling can
  move conf by an ulp versus the single-pass reference, which matters only for a row exactly on a bin edge.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl

from ._utils import calibration_bins_config, interpreting, pow2_divisor

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _exp(x, FAST_EXP: tl.constexpr):
    """exp(x) in float32. FAST_EXP (real GPU only): ex2.approx.ftz, which skips the denormal-result fixup of
    tl.exp (results below 2**-126 become 0, irrelevant here: every sum holds a 1). exp(0) == 1 exactly both ways."""
    if FAST_EXP:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(x)


@triton.jit
def _log(x, FAST: tl.constexpr):
    """log(x) in float32; FAST (real GPU only): lg2.approx.ftz * ln 2 instead of the accurate libm-style log."""
    if FAST:
        l2 = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                       pack=1)
        return l2 * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _log1p_rest(rest, s, inv_s, FAST: tl.constexpr):
    """log1p(rest) for rest >= 0 in float32, given s = fl(1 + rest) and inv_s = 1 / s (once per row).

    rest < 1/64: the series r - r^2/2 + r^3/3 - r^4/4 (truncation below 1.2e-8 relative), so a near-saturated
    row's NLL (~rest) keeps its digits (lg2.approx's absolute error ~2**-22 near 1 would swamp it); else
    log(s) + (rest - (s - 1)) / s, where s - 1 and rest - (s - 1) (the rounding error of s) are exact."""
    small = rest * (1.0 + rest * (-0.5 + rest * (0.3333333333333333 - rest * 0.25)))
    big = _log(s, FAST) + (rest - (s - 1.0)) * inv_s
    return tl.where(rest < 0.015625, small, big)


@triton.jit
def _expand_row(v):
    """(BLOCK_N,) row vector -> (1, BLOCK_N, 1, 1), expanding in the reverse order of the row reductions (axes 3, 0,
    2 of the tile) so the compiler needs no layout conversion."""
    return tl.expand_dims(tl.expand_dims(tl.expand_dims(v, 1), 0), 3)


@triton.jit
def _load_tile(row_ptr, rmask, c0, q_idx, l_idx, v_idx, C_eff, stride_xc, W: tl.constexpr, V: tl.constexpr,
               COL_I64: tl.constexpr, PAIRS: tl.constexpr):
    """Raw (R, BLOCK_N, L, V) logits of classes c0 + q * W + l * V + v; padding and rows >= N read as 0.

    PAIRS (bf16, stride_c == 1, even C and row offsets): v indexes V = VEC / 2 int32 words, each holding the two
    bf16 classes c0 + q * W + l * 2V + 2v (low half) and + 1 (high half)."""
    if PAIRS:
        # Word index (contiguous along v) and word count C_eff / 2 (a multiple of C_ALIGN / 2): vector loads.
        HALF_W: tl.constexpr = W // 2
        wcols = c0 // 2 + (q_idx[:, None, None, None] * HALF_W + l_idx[None, None, :, None] * V
                           + v_idx[None, None, None, :])
        wptr = row_ptr.to(tl.pointer_type(tl.int32))
        return tl.load(wptr[None, :, None, None] + wcols, mask=rmask[None, :, None, None] & (wcols < C_eff // 2),
                       other=0)
    else:
        cols = c0 + (q_idx[:, None, None, None] * W + l_idx[None, None, :, None] * V + v_idx[None, None, None, :])
        if COL_I64:
            col_off = cols.to(tl.int64) * stride_xc
        else:
            col_off = cols * stride_xc
        return tl.load(row_ptr[None, :, None, None] + col_off, mask=rmask[None, :, None, None] & (cols < C_eff),
                       other=0.0)


@triton.jit
def _tile_update(xraw, c0, q_idx, l_idx, v_idx, C_eff, mx, rest, rest2, pred, W: tl.constexpr, V: tl.constexpr,
                 BLOCK_C: tl.constexpr, FAST_EXP: tl.constexpr, PAIRS: tl.constexpr):
    """Fold the (R, BLOCK_N, L, V) column tile starting at class c0 into the online row statistics: running max
    ``mx``, first argmax ``pred`` and ``rest`` / ``rest2``, the sums of exp(x - mx) and its square over every
    class but ``pred`` (the argmax's exact 1 stays out of the sums, see the module docstring).

    Every row reduction goes over the in-thread axes V and R first, then over the lanes L (one shuffle tree)."""
    if PAIRS:
        # Each int32 word holds two bf16: bf16 -> f32 is a 16-bit shift, one integer op per class.
        x = (xraw << 16).to(tl.float32, bitcast=True)  # even classes
        x_hi = (xraw & -65536).to(tl.float32, bitcast=True)  # odd classes
        VW: tl.constexpr = 2 * V  # classes per lane per segment
        slot = q_idx[:, None, None, None] * W + v_idx[None, None, None, :] * 2  # even class of each word
    else:
        x = xraw.to(tl.float32)
        x_hi = x  # unused
        VW: tl.constexpr = V
        slot = q_idx[:, None, None, None] * W + v_idx[None, None, None, :]  # (R, 1, 1, V): same in every thread
    lane = l_idx[None, :] * VW  # (1, L)
    # (R, 1, L, V): not padding. Counted in load units (words for PAIRS) so the compiler sees it constant per vector.
    if PAIRS:
        HALF_W: tl.constexpr = W // 2
        col_ok = q_idx[:, None, None, None] * HALF_W + l_idx[None, None, :, None] * V + v_idx[None, None, None, :] \
            < C_eff // 2 - c0 // 2
    else:
        col_ok = slot + l_idx[None, None, :, None] * V < C_eff - c0
    # x + 0 * x is x for finite x and NaN for NaN/+-inf: a non-finite row ends with a NaN s (exp(NaN) = NaN),
    # which flags it, at no extra reduction. Padding -> -inf (exp -> 0).
    xm = tl.where(col_ok, x + x * 0.0, float("-inf"))
    if PAIRS:
        xm_hi = tl.where(col_ok, x_hi + x_hi * 0.0, float("-inf"))
        tmax = tl.max(tl.max(tl.max(tl.maximum(xm, xm_hi), axis=3), axis=0), axis=1)
    else:
        xm_hi = xm  # unused
        tmax = tl.max(tl.max(tl.max(xm, axis=3), axis=0), axis=1)
    # First index of the maximum: in-thread minimum of the slot constants (immediates), plus the lane's offset,
    # then the minimum over lanes. No match in a thread -> 2 * BLOCK_C, above every real index.
    tmax4 = _expand_row(tmax)
    cand = tl.where(xm == tmax4, slot, 2 * BLOCK_C)
    if PAIRS:
        cand = tl.minimum(cand, tl.where(xm_hi == tmax4, slot + 1, 2 * BLOCK_C))
    k = tl.min(tl.min(cand, axis=3), axis=0)  # (BLOCK_N, L)
    first = tl.min(k + lane, axis=1)
    new_mx = tl.maximum(mx, tmax)
    grows = tmax > mx  # strict: earlier tiles win ties
    pred = tl.where(grows, c0 + first, pred)
    alpha = _exp(mx - new_mx, FAST_EXP)  # 0 on the first tile (mx = -inf); exactly 1 when the max stays
    mx4 = _expand_row(new_mx)
    # The tile's new max (class c0 + first) stays out of the tile sums; when the max stays, every class of the
    # tile joins the rest (a later class equal to the max is a tie: exactly 1). In thread (q, l, v) terms: drop the
    # slot equal to first - lane (never a slot when nothing is dropped: -1 - lane < 0).
    slot_drop = _expand_row(tl.where(grows, first, -1)) - l_idx[None, None, :, None] * VW  # (1, BLOCK_N, L, 1)
    e = tl.where(slot == slot_drop, 0.0, _exp(xm - mx4, FAST_EXP))
    if PAIRS:
        e_hi = tl.where(slot + 1 == slot_drop, 0.0, _exp(xm_hi - mx4, FAST_EXP))
        es = e + e_hi
        es2 = e * e + e_hi * e_hi
    else:
        es = e
        es2 = e * e
    # When the max moves, the old max's 1 joins the rest: rest = (rest + 1) * alpha (0 on the first tile).
    one = tl.where(grows, 1.0, 0.0)
    rest = (rest + one) * alpha + tl.sum(tl.sum(tl.sum(es, axis=3), axis=0), axis=1)
    rest2 = (rest2 + one) * (alpha * alpha) + tl.sum(tl.sum(tl.sum(es2, axis=3), axis=0), axis=1)
    return new_mx, rest, rest2, pred


@triton.jit
def _calibration_bins_kernel(
    x_ptr,
    y_ptr,
    count_ptr,
    correct_ptr,
    conf_ptr,
    sums_ptr,
    nonfinite_ptr,
    sconf_ptr,
    scorr_ptr,
    N,
    C,
    n_bins,
    P,
    n_rb,
    stride_xm,
    stride_xn,
    stride_xc,
    stride_ym,
    stride_yn,
    ROW_ALIGN: tl.constexpr,
    C_ALIGN: tl.constexpr,
    COL_I64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R: tl.constexpr,
    L: tl.constexpr,
    V: tl.constexpr,
    NB_PAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BINS_MODE: tl.constexpr,
    HAS_SAMPLES: tl.constexpr,
    FAST_EXP: tl.constexpr,
    PAIRS: tl.constexpr,
):
    if PAIRS:
        W: tl.constexpr = L * V * 2  # V counts int32 words of two bf16
    else:
        W: tl.constexpr = L * V
    BLOCK_C: tl.constexpr = R * W
    pid = tl.program_id(0)
    m = pid // P
    j = pid - m * P
    m64 = m.to(tl.int64)
    nb1 = n_bins + 1
    # Row offsets written as (k * (stride // A)) * A so the compiler sees their divisibility by A (vector loads).
    x_model = x_ptr + (m64 * (stride_xm // ROW_ALIGN)) * ROW_ALIGN
    y_model = y_ptr + m64 * stride_ym
    C_eff = (C // C_ALIGN) * C_ALIGN  # == C; this form tells the compiler C % C_ALIGN == 0 (mask constancy)

    rows = tl.arange(0, BLOCK_N).to(tl.int64)  # row indices in int64: the prefetch runs up to N + P * BLOCK_N
    q_idx = tl.arange(0, R)
    l_idx = tl.arange(0, L)
    v_idx = tl.arange(0, V)
    bins = tl.arange(0, NB_PAD)
    acc_nll = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc_brier = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    if BINS_MODE == 1:  # per-row-slot bins: (BLOCK_N, NB_PAD), bins along the lanes of the row's warp
        acc_cnt = tl.zeros([BLOCK_N, NB_PAD], dtype=tl.int32)
        acc_cor = tl.zeros([BLOCK_N, NB_PAD], dtype=tl.int32)
        acc_conf = tl.zeros([BLOCK_N, NB_PAD], dtype=tl.float64)
    if BINS_MODE == 2:  # per-tile reduced bins: (NB_PAD,)
        acc_cnt = tl.zeros([NB_PAD], dtype=tl.int32)
        acc_cor = tl.zeros([NB_PAD], dtype=tl.int32)
        acc_conf = tl.zeros([NB_PAD], dtype=tl.float64)

    # Prefetch of the first row tile (its first column tile): the loop loads tile k+1 before reducing tile k.
    n = tl.cast(j, tl.int64) * BLOCK_N + rows
    rmask = n < N
    row_ptr = x_model + (n * (stride_xn // ROW_ALIGN)) * ROW_ALIGN
    x_next = _load_tile(row_ptr, rmask, 0, q_idx, l_idx, v_idx, C_eff, stride_xc, W, V, COL_I64, PAIRS)
    y_next = tl.load(y_model + n * stride_yn, mask=rmask, other=0)

    for rb in range(j, n_rb, P):
        rb64 = tl.cast(rb, tl.int64)
        n = rb64 * BLOCK_N + rows
        rmask = n < N
        n64 = n
        row_ptr = x_model + (n64 * (stride_xn // ROW_ALIGN)) * ROW_ALIGN
        x_cur = x_next
        yv = y_next
        y_ok = (yv >= 0) & (yv < C)
        y = tl.where(y_ok, yv, 0).to(tl.int32)
        xy = tl.load(row_ptr + y.to(tl.int64) * stride_xc, mask=rmask, other=0.0).to(tl.float32)
        # Next row tile of this program (rows >= N are masked off: no memory traffic past the end).
        n_nx = (rb64 + P) * BLOCK_N + rows
        rmask_nx = n_nx < N
        n64_nx = n_nx
        row_ptr_nx = x_model + (n64_nx * (stride_xn // ROW_ALIGN)) * ROW_ALIGN

        mx = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        rest = tl.zeros([BLOCK_N], dtype=tl.float32)
        rest2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        pred = tl.zeros([BLOCK_N], dtype=tl.int32)
        if SINGLE_TILE:
            x_next = _load_tile(row_ptr_nx, rmask_nx, 0, q_idx, l_idx, v_idx, C_eff, stride_xc, W, V, COL_I64, PAIRS)
            y_next = tl.load(y_model + n64_nx * stride_yn, mask=rmask_nx, other=0)
            mx, rest, rest2, pred = _tile_update(x_cur, 0, q_idx, l_idx, v_idx, C_eff, mx, rest, rest2, pred, W, V,
                                                 BLOCK_C, FAST_EXP, PAIRS)
        else:
            for c0 in range(0, C, BLOCK_C):
                # Next column tile of these rows; past the last one, the first column tile of the next row tile.
                more = c0 + BLOCK_C < C
                c_nx = tl.multiple_of(tl.where(more, c0 + BLOCK_C, 0), BLOCK_C)
                n_sel = tl.where(more, n, n_nx)
                ptr_sel = x_model + (n_sel * (stride_xn // ROW_ALIGN)) * ROW_ALIGN
                x_next = _load_tile(ptr_sel, n_sel < N, c_nx, q_idx, l_idx, v_idx, C_eff, stride_xc, W, V, COL_I64,
                                    PAIRS)
                mx, rest, rest2, pred = _tile_update(x_cur, c0, q_idx, l_idx, v_idx, C_eff, mx, rest, rest2, pred, W,
                                                     V, BLOCK_C, FAST_EXP, PAIRS)
                x_cur = x_next
            y_next = tl.load(y_model + n64_nx * stride_yn, mask=rmask_nx, other=0)

        row_ok = (rest == rest) & y_ok  # rest is NaN iff the row held a NaN or +-inf
        valid = rmask & row_ok
        s = 1.0 + rest
        conf = tl.math.div_rn(tl.full([BLOCK_N], 1.0, dtype=tl.float32), s)
        # NLL = (mx - x_y) + log1p(rest): the difference in float64 (it overflows float32 for finite logits such
        # as 3e38 and -3e38), log1p keeps the NLL of a near-saturated row accurate.
        nll = (mx.to(tl.float64) - xy.to(tl.float64)) + _log1p_rest(rest, s, conf, FAST_EXP).to(tl.float64)
        # Brier = ((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2: e_y == 1 exactly for the label at the max,
        # which leaves (rest^2 + rest2) / s^2, free of the cancellation of 1 - 2 p_y + p_y^2 near saturation.
        ey = _exp(xy - mx, FAST_EXP)
        u = (1.0 - ey) + rest
        brier = (u * u + ((1.0 - ey * ey) + rest2)) * (conf * conf)
        correct = (pred == y) & valid
        acc_nll += tl.where(valid, nll, 0.0)
        acc_brier += tl.where(valid, brier, 0.0).to(tl.float64)
        acc_bad += (rmask & (~row_ok)).to(tl.int32)

        conf64 = tl.where(valid, conf, 0.0).to(tl.float64)
        b = (conf64 * n_bins).to(tl.int32)  # conf > 0: truncation == floor
        b = tl.minimum(tl.maximum(b, 0), n_bins)
        if HAS_SAMPLES:
            so = m64 * N + n64
            tl.store(sconf_ptr + so, tl.where(valid, conf, 0.0), mask=rmask)
            tl.store(scorr_ptr + so, correct.to(tl.uint8), mask=rmask)
        if BINS_MODE == 1:
            # One-hot (BLOCK_N, NB_PAD) added into per-row-slot accumulators. The row axis stays where the tile put
            # it and the bin axis lies along the row's lanes (one cell per thread when NB_PAD <= lanes per row), so
            # nothing crosses warps per tile (no barrier); rows are summed once, at the end.
            hit = tl.expand_dims(tl.where(valid, b, -1), 1) == tl.expand_dims(bins, 0)
            acc_cnt += hit.to(tl.int32)
            acc_cor += (hit & tl.expand_dims(correct, 1)).to(tl.int32)
            acc_conf += tl.where(hit, tl.expand_dims(conf64, 1), 0.0)
        elif BINS_MODE == 2:
            # One-hot (NB_PAD, BLOCK_N) reduced over the tile's rows right away (small C: many rows per tile, few
            # lanes per row). Count and correct travel packed in one int32 (both <= BLOCK_N < 2**16 per tile).
            hit = bins[:, None] == tl.where(valid, b, -1)[None, :]
            w = 1 + correct.to(tl.int32) * 65536
            packed = tl.sum(tl.where(hit, w[None, :], 0), axis=1)
            acc_cnt += packed & 0xFFFF
            acc_cor += packed >> 16
            acc_conf += tl.sum(tl.where(hit, conf64[None, :], 0.0), axis=1)
        else:  # BINS_MODE == 0: many bins, little contention: three relaxed atomics per row
            off = m64 * nb1 + b
            one = tl.full([BLOCK_N], 1, dtype=tl.int64)
            tl.atomic_add(count_ptr + off, one, mask=valid, sem="relaxed")
            tl.atomic_add(correct_ptr + off, one, mask=correct, sem="relaxed")
            tl.atomic_add(conf_ptr + off, conf64, mask=valid, sem="relaxed")

    if BINS_MODE != 0:
        if BINS_MODE == 1:
            cnt = tl.sum(acc_cnt, axis=0)
            cor = tl.sum(acc_cor, axis=0)
            csum = tl.sum(acc_conf, axis=0)
        else:
            cnt = acc_cnt
            cor = acc_cor
            csum = acc_conf
        boff = m64 * nb1 + bins
        used = (bins < nb1) & (cnt != 0)
        tl.atomic_add(count_ptr + boff, cnt.to(tl.int64), mask=used, sem="relaxed")
        tl.atomic_add(correct_ptr + boff, cor.to(tl.int64), mask=used & (cor != 0), sem="relaxed")
        tl.atomic_add(conf_ptr + boff, csum, mask=used, sem="relaxed")
    tl.atomic_add(sums_ptr + 2 * m64, tl.sum(acc_nll, axis=0), sem="relaxed")
    tl.atomic_add(sums_ptr + 2 * m64 + 1, tl.sum(acc_brier, axis=0), sem="relaxed")
    bad = tl.sum(acc_bad, axis=0)
    tl.atomic_add(nonfinite_ptr + m64, bad.to(tl.int64), mask=bad != 0, sem="relaxed")


@contextlib.contextmanager
def _quiet_interpreter(interpret: bool):
    """Under the interpreter, silence numpy's warnings about the NaN arithmetic of non-finite rows (intended: those
    rows are flagged by it and excluded)."""
    if not interpret:
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _check_out(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"outs[{name!r}]: expected contiguous {dtype} {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
        )


def calibration_bins_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int,
    outs: dict,
    *,
    block_n: int | None = None,
    block_c: int | None = None,
    programs_per_model: int | None = None,
    bins_mode: int | None = None,
    bf16_pairs: bool | None = None,
) -> None:
    """Accumulate the calibration statistics of ``logits (M, N, C)`` / ``labels (M, N)`` into ``outs``.

    Same contract as the other backends (see the module docstring of ``vlmfast.ops.calibration_bins``); the
    keyword-only arguments override the launch heuristics (tests only).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits: expected (M, N, C), got {tuple(logits.shape)}")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"logits: expected float32, float16 or bfloat16, got {logits.dtype}")
    M, N, C = (int(v) for v in logits.shape)
    if labels.dim() != 2 or tuple(labels.shape) != (M, N):
        raise ValueError(f"labels: expected ({M}, {N}), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels: expected int32 or int64, got {labels.dtype}")
    n_bins = int(n_bins)
    if not 1 <= n_bins <= 1024:
        raise ValueError(f"n_bins: expected 1 <= n_bins <= 1024, got {n_bins}")
    if N >= 2**31:
        raise ValueError(f"logits: at most 2**31 - 1 samples per model, got N = {N}")
    dev = logits.device
    if labels.device != dev:
        raise ValueError(f"labels: expected on {dev}, got {labels.device}")
    nb1 = n_bins + 1
    _check_out(outs["bin_count"], "bin_count", torch.int64, (M, nb1), dev)
    _check_out(outs["bin_correct"], "bin_correct", torch.int64, (M, nb1), dev)
    _check_out(outs["bin_conf"], "bin_conf", torch.float64, (M, nb1), dev)
    _check_out(outs["sums"], "sums", torch.float64, (M, 2), dev)
    _check_out(outs["nonfinite"], "nonfinite", torch.int64, (M,), dev)
    sconf, scorr = outs.get("sample_conf"), outs.get("sample_correct")
    has_samples = sconf is not None or scorr is not None
    if has_samples:
        if sconf is None or scorr is None:
            raise ValueError("outs: sample_conf and sample_correct must be both given or both None")
        _check_out(sconf, "sample_conf", torch.float32, (M, N), dev)
        _check_out(scorr, "sample_correct", torch.bool, (M, N), dev)
        scorr_u8 = scorr.view(torch.uint8)
    else:
        sconf, scorr_u8 = outs["bin_conf"], outs["bin_count"]  # placeholders, never touched
    if M == 0 or N == 0:
        return
    if C == 0:
        raise ValueError("logits: C must be >= 1")

    interpret = interpreting()
    cfg = calibration_bins_config(
        M, N, C, logits.element_size(), n_bins, dev, interpret,
        block_n=block_n, block_c=block_c, programs_per_model=programs_per_model, bins_mode=bins_mode,
    )
    # Strides of size-1 dimensions are irrelevant: zero them so they never spoil the alignment proof.
    sxm, sxn, sxc = (0 if size == 1 else st for size, st in zip(logits.shape, logits.stride()))
    sym, syn = (0 if size == 1 else st for size, st in zip(labels.shape, labels.stride()))
    vec = 16 // logits.element_size()
    if sxc == 1:
        row_align = min(pow2_divisor(sxm, vec), pow2_divisor(sxn, vec))
        c_align = pow2_divisor(C, vec)
    else:
        row_align, c_align = 1, 1
    col_i64 = (C - 1 + cfg.block_c) * abs(sxc) >= 2**31
    # bf16 read as int32 words (two classes each) when the layout allows it: contiguous classes, even C, even row
    # offsets, 4-byte aligned base.
    use_pairs = (
        logits.dtype == torch.bfloat16 and sxc == 1 and row_align >= 2 and c_align >= 2 and cfg.block_v >= 2
        and logits.data_ptr() % 4 == 0
    )
    if bf16_pairs is not None:
        use_pairs = use_pairs and bool(bf16_pairs)
    v_arg = cfg.block_v // 2 if use_pairs else cfg.block_v
    # The register cap (2 CTAs per SM) fits the vectorised tiles without spilling; scalar-load layouts (strided
    # classes, row strides that are not a multiple of the vector) need more registers and run uncapped.
    vector_loads = sxc == 1 and (use_pairs or min(row_align, c_align) == vec)
    n_rb = -(-N // cfg.block_n)
    grid = (M * cfg.programs_per_model,)
    with _quiet_interpreter(interpret):
        _calibration_bins_kernel[grid](
            logits, labels,
            outs["bin_count"], outs["bin_correct"], outs["bin_conf"], outs["sums"], outs["nonfinite"],
            sconf, scorr_u8,
            N, C, n_bins, cfg.programs_per_model, n_rb,
            sxm, sxn, sxc, sym, syn,
            ROW_ALIGN=row_align, C_ALIGN=c_align, COL_I64=col_i64,
            BLOCK_N=cfg.block_n, R=cfg.block_r, L=cfg.block_l, V=v_arg, NB_PAD=cfg.nb_pad,
            SINGLE_TILE=cfg.single_tile, BINS_MODE=cfg.bins_mode, HAS_SAMPLES=has_samples,
            FAST_EXP=not interpret, PAIRS=use_pairs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg is not None and vector_loads else {}),
        )
