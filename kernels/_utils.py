"""Launch heuristics shared by the Triton kernels in ``vlmfast.kernels``.

Nothing here imports Triton: these are plain-Python helpers (power-of-two rounding, interpreter detection, SM
count, block-size choice) so that they can be tested and reasoned about without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), which accepts CPU tensors.

    The one definition of it: the dispatcher imports this (``kernels/`` never imports the package's internals).
    Under the interpreter every tile step costs milliseconds, so the heuristics below pick few, large tiles there.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two <= ``cap`` (a power of two) that divides ``x``; ``cap`` for x == 0."""
    x = abs(int(x))
    d = 1
    while d < cap and x % (2 * d) == 0:
        d *= 2
    return d


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Number of streaming multiprocessors of a CUDA device (a nominal 4 for the interpreter / CPU)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


# ----------------------------------------------------------------------------------------------------------
# calibration_bins
# ----------------------------------------------------------------------------------------------------------

# A column tile is R segments of W classes; W = one warp-wide row of 16-byte vectors (32 lanes x VEC classes),
# so a warp reads W contiguous classes per segment and each thread holds R vectors of one row.
# Up to CB_ELEMS_PER_THREAD logits per thread per tile (R * VEC): 32 = four LDG.128 of bf16/fp16 per thread.
CB_ELEMS_PER_THREAD = 32
CB_MAX_BLOCK_N = 256
CB_NUM_WARPS = 8
# Register cap so that this many CTAs fit on one SM (65536 registers): 2 x 8 warps -> 128 registers per thread.
# The kernel needs ~120 at the default tiles; without the cap ptxas takes up to ~170 and only one CTA fits.
CB_CTAS_PER_SM = 2
# Bin accumulation modes (BINS_MODE of the kernel):
#   1 = per-row-slot register accumulators (BLOCK_N, NB_PAD), bins along the lanes of a row: no per-tile
#       cross-warp traffic; used while each thread holds <= CB_ROW_SLOT_MAX_CELLS of them (large C);
#   2 = per-tile one-hot reduced over the tile's rows into (NB_PAD,) registers (small C: many rows per tile);
#   0 = three relaxed global atomics per row (NB_PAD > CB_BINS_IN_REGS_MAX: many bins, so little contention).
CB_BINS_IN_REGS_MAX = 128
CB_ROW_SLOT_MAX_CELLS = 4
CB_ONEHOT_MAX_CELLS = 8192  # BLOCK_N * NB_PAD of the per-tile one-hot comparison (mode 2)
# Persistent grid: about this many programs per SM in total, each handling >= CB_MIN_TILES_PER_PROG row tiles
# (fewer programs => fewer end-of-program atomics; more => better load balance).
CB_PROGRAMS_PER_SM = 32
CB_MIN_TILES_PER_PROG = 4


@dataclass(frozen=True)
class CalibrationBinsConfig:
    block_n: int  # rows per tile (power of two)
    block_r: int  # segments per column tile (power of two)
    block_w: int  # classes per segment (power of two) = block_l lanes x block_v classes per thread
    block_v: int  # classes per thread per segment: one 16-byte vector (fewer when block_w is smaller)
    single_tile: bool  # C <= block_c: one column tile per row, no online loop
    nb_pad: int  # next_power_of_2(n_bins + 1)
    bins_mode: int  # 1: per-row-slot registers, 2: per-tile reduced registers, 0: per-row global atomics
    programs_per_model: int  # grid = (M * programs_per_model,), grid-strided over the row tiles of one model
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register cap (None: no cap; always None under the interpreter)

    @property
    def block_l(self) -> int:
        return self.block_w // self.block_v

    @property
    def block_c(self) -> int:
        return self.block_r * self.block_w


def calibration_bins_config(
    M: int,
    N: int,
    C: int,
    elem_size: int,
    n_bins: int,
    device: torch.device,
    interpret: bool | None = None,
    *,
    block_n: int | None = None,
    block_c: int | None = None,
    block_w: int | None = None,
    programs_per_model: int | None = None,
    bins_mode: int | None = None,
    num_warps: int | None = None,
) -> CalibrationBinsConfig:
    """Block sizes and grid for ``calibration_bins`` from the problem shape; keyword overrides are for tests.

    GPU (bf16/fp16, C = 1000): W = 256, R = 4 (BLOCK_C = 1024, one tile per row), BLOCK_N = 8 rows (one per
    warp, 8 warps): 32 logits = 4 x 16 B per thread per tile, 16 KiB per tile, the next tile prefetched.
    fp32: W = 128, R = 8. Small C: W = next_pow2(C), several rows per warp and per thread. C > 1024: online
    loop over 1024-class tiles. Interpreter: the same W/R, BLOCK_N = 64 (each tile step costs milliseconds there).
    """
    if interpret is None:
        interpret = interpreting()
    nb_pad = next_power_of_2(n_bins + 1)
    vec = max(1, 16 // int(elem_size))
    c_pow2 = max(2, next_power_of_2(C))
    w = min(c_pow2, 32 * vec)
    if block_w is not None:
        w = next_power_of_2(block_w)
    r_max = max(1, CB_ELEMS_PER_THREAD // min(w, vec))
    r = min(next_power_of_2(cdiv(C, w)), r_max)
    if block_c is not None:
        bc = next_power_of_2(block_c)
        w = min(w, bc)
        r = bc // w
    v = min(w, vec)
    lanes = w // v  # threads per row
    warps = CB_NUM_WARPS if num_warps is None else int(num_warps)
    if interpret and num_warps is None:
        warps = 4

    if bins_mode is not None:
        mode = int(bins_mode)
    elif nb_pad > CB_BINS_IN_REGS_MAX:
        mode = 0
    elif cdiv(nb_pad, lanes) <= CB_ROW_SLOT_MAX_CELLS:
        mode = 1
    else:
        mode = 2

    if interpret:
        bn = 64
    else:
        rows_per_warp = max(1, 32 // lanes)
        # Up to CB_ELEMS_PER_THREAD logits per thread: several rows per thread for small C (at most 2: every row
        # costs ~25 registers of state), one row per thread with per-row-slot bins (their cells multiply).
        rows_per_thread = max(1, min(2, CB_ELEMS_PER_THREAD // (r * v)))
        if mode == 1:
            rows_per_thread = 1
        bn = min(CB_MAX_BLOCK_N, rows_per_warp * warps * rows_per_thread)
        # Small problems: shrink the row tile until there are enough tiles to fill the GPU, and the warps with it
        # (a warp without a row of its own would only duplicate another one's work).
        sms = num_sms(device)
        while bn > 1 and M * cdiv(N, bn) < 2 * sms:
            bn //= 2
        if num_warps is None:
            warps = max(1, min(warps, bn // rows_per_warp))
    if mode == 2:
        bn = max(1, min(bn, CB_ONEHOT_MAX_CELLS // nb_pad))
    bn = min(bn, max(1, next_power_of_2(N)))
    if block_n is not None:
        bn = next_power_of_2(block_n)
    if mode == 2:
        bn = min(bn, 1 << 15)  # per-tile counts travel packed in 16-bit halves

    n_rb = cdiv(N, bn)
    if programs_per_model is not None:
        ppm = programs_per_model
    elif interpret:
        ppm = min(n_rb, 2)  # still exercises the grid-strided loop and the prefetch
    else:
        target = num_sms(device) * CB_PROGRAMS_PER_SM
        tiles_per_prog = max(CB_MIN_TILES_PER_PROG, cdiv(M * n_rb, target))
        ppm = cdiv(n_rb, tiles_per_prog)
    ppm = max(1, min(int(ppm), n_rb))
    return CalibrationBinsConfig(
        block_n=bn,
        block_r=r,
        block_w=w,
        block_v=min(w, vec),
        single_tile=C <= r * w,
        nb_pad=nb_pad,
        bins_mode=mode,
        programs_per_model=ppm,
        num_warps=warps,
        num_stages=1,  # no software pipeliner for these loads; the kernel prefetches the next tile by hand
        maxnreg=None if interpret else min(255, 65536 // (warps * 32 * CB_CTAS_PER_SM)) // 8 * 8,
    )
