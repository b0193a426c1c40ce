"""Binning helpers of the calibration metrics: group sums, bin gaps and errors, quantile (DAC) bins, and the
equal-mass rule. Pure torch on ``(..., N)`` tensors, importing nothing else of vlmfast; the heavy step (sorting for
equal-mass bins) is the op :mod:`vlmfast.ops.equal_mass_bins`, whose reference uses these helpers."""

from __future__ import annotations

import math

import torch

__all__ = ["binned_errors", "equal_mass_ids", "gaps", "group_sums", "percentile_linear", "quantile_bins",
           "weighted_error"]


def equal_mass_ids(N: int, n_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group id of each position of a sorted length-``N`` vector cut into ``n_bins`` contiguous groups whose sizes
    differ by at most one, the first ``N mod n_bins`` larger (``torch.tensor_split`` semantics)."""
    q, r = divmod(N, n_bins)
    pos = torch.arange(N, device=device)
    big = r * (q + 1)
    return torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))


def group_sums(key: torch.Tensor, correct: torch.Tensor, conf: torch.Tensor, size: int):
    """Per group (``key`` along the last dim, values in ``[0, size)``): the count, the number correct and the sum
    of confidences, as ``(..., size)`` int64, int64 and float64 tensors."""
    shape = (*key.shape[:-1], size)
    count = torch.zeros(shape, dtype=torch.int64, device=key.device).scatter_add_(-1, key, torch.ones_like(key))
    n_correct = torch.zeros_like(count).scatter_add_(-1, key, correct.long())
    conf_sum = torch.zeros(shape, dtype=torch.float64, device=key.device).scatter_add_(-1, key, conf.double())
    return count, n_correct, conf_sum


def gaps(count: torch.Tensor, correct: torch.Tensor, conf_sum: torch.Tensor):
    """Per-bin mean accuracy and confidence (NaN where empty), |acc - conf| (0 where empty), and the non-empty mask."""
    countf = count.to(torch.float64)
    nonempty = count > 0
    denom = torch.where(nonempty, countf, torch.ones_like(countf))
    acc = torch.where(nonempty, correct.to(torch.float64) / denom, torch.full_like(countf, math.nan))
    conf = torch.where(nonempty, conf_sum / denom, torch.full_like(countf, math.nan))
    gap = torch.where(nonempty, (acc - conf).abs(), torch.zeros_like(countf))
    return acc, conf, gap, nonempty


def weighted_error(count, correct, conf_sum, n_total: int) -> torch.Tensor:
    """sum over groups (last dim) of (n_g / n_total) |acc_g - conf_g| (empty groups contribute 0)."""
    _, _, gap, _ = gaps(count, correct, conf_sum)
    return (count.to(torch.float64) / n_total * gap).sum(dim=-1)


def binned_errors(count, correct, conf_sum, n_total: int):
    """``(ece, rmsce, mce, mce_weighted, bin_accuracy, bin_confidence)`` of ``(M, n_bins)`` bin sums."""
    acc, conf, gap, nonempty = gaps(count, correct, conf_sum)
    w = count.to(torch.float64) / n_total
    ece = (w * gap).sum(dim=1)
    rmsce = torch.sqrt((w * gap * gap).sum(dim=1))
    mce = torch.where(nonempty, gap, torch.full_like(gap, -1.0)).amax(dim=1).clamp_min(0.0)
    mce_weighted = (w * gap).amax(dim=1)
    return ece, rmsce, mce, mce_weighted, acc, conf


def percentile_linear(sorted_vals: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """numpy.percentile(method="linear") of one sorted float64 vector at levels in [0, 100]."""
    n = sorted_vals.shape[0]
    idx = levels / 100.0 * (n - 1)
    lo = idx.floor().long().clamp_(0, n - 1)
    hi = (lo + 1).clamp_(max=n - 1)
    t = idx - lo.to(idx.dtype)
    a, b = sorted_vals[lo], sorted_vals[hi]
    # numpy's _lerp: a + (b - a) t, evaluated from the upper end when t >= 0.5
    return torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


def quantile_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index per value (one model, 1-D) by scikit-learn's quantile KBinsDiscretizer with linear percentiles:
    edges at the 0, 100/n, ..., 100 percentiles, bins narrower than 1e-8 merged, ``[lo, hi)`` with the last closed.
    """
    v = values.to(torch.float64)
    s, _ = torch.sort(v)
    levels = torch.linspace(0, 100, n_bins + 1, dtype=torch.float64, device=v.device)
    edges = percentile_linear(s, levels)
    keep = torch.ones_like(edges, dtype=torch.bool)
    keep[1:] = (edges[1:] - edges[:-1]) > 1e-8
    edges = edges[keep]
    return torch.searchsorted(edges[1:-1].contiguous(), v.contiguous(), right=True)
