"""PIECE: proximity-informed expected calibration error (Xiong et al., NeurIPS 2023), as used by DAC and DOR.

For each test sample, proximity = exp(-mean L2 distance from its feature to its k nearest reference features)
(DAC/DOR: the reference set is the base-class validation images, k = 5). Samples are binned jointly by
proximity (``proximity_bins`` equal-mass bins) and confidence (``n_bins`` equal-width bins, last bin closed);
PIECE = sum over non-empty joint bins of (n / N) |acc - conf|. A model whose miscalibration depends on how far a
sample lies from the reference data scores higher than its ECE.

The k-NN search runs in chunks on the features' device (never an N x R distance matrix at once), in float64 on
the CPU and float32 on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmfast.metrics.binning import equal_mass_ids, group_sums, quantile_bins, weighted_error
from vlmfast.metrics.calibration_error import CONVENTIONS
from vlmfast.ops.calibration_bins import as_tensor, check_inputs, check_n_bins, run_calibration_bins


def _check_features(x: Any, name: str, M: int, n_expected: int | None) -> torch.Tensor:
    x = as_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {x.dtype}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() != 3 or x.shape[0] != M:
        raise ValueError(f"{name}: expected shape (n, D) or ({M}, n, D), got {tuple(x.shape)}")
    if n_expected is not None and x.shape[1] != n_expected:
        raise ValueError(f"{name}: expected {n_expected} rows (one per sample), got {x.shape[1]}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name}: empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        idx = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, got {float(x[tuple(idx)])} at index {tuple(idx)}")
    return x


def proximity(
    features: Any, reference_features: Any, k: int = 5, *, exclude_self: bool = False, chunk_size: int = 4096
) -> torch.Tensor:
    """exp(-mean L2 distance to the k nearest reference features), per row of ``features``.

    Args:
        features: ``(N, D)`` or ``(M, N, D)`` (one feature set per model).
        reference_features: ``(R, D)`` or ``(M, R, D)``.
        k: number of neighbours (1 <= k <= R; R - 1 with ``exclude_self``).
        exclude_self: drop each row's nearest neighbour (use when the reference set *is* the feature set).
        chunk_size: rows per chunk of the distance computation.

    Returns:
        ``(N,)`` or ``(M, N)`` proximities in (0, 1].
    """
    f = as_tensor(features, "features")
    squeeze = f.dim() == 2
    M = 1 if squeeze else f.shape[0]
    f = _check_features(f, "features", M, None)
    ref = as_tensor(reference_features, "reference_features")
    if ref.dim() == 2:
        ref = ref.unsqueeze(0).expand(M, *ref.shape)
    ref = _check_features(ref, "reference_features", M, None)
    if ref.device != f.device:
        raise ValueError(f"reference_features: expected on {f.device}, got {ref.device}")
    if ref.shape[2] != f.shape[2]:
        raise ValueError(f"reference_features: expected dimension D = {f.shape[2]}, got {ref.shape[2]}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    kk = k + (1 if exclude_self else 0)
    if k < 1 or kk > ref.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= {ref.shape[1] - int(exclude_self)} (reference rows), got {k}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    dtype = torch.float64 if f.device.type == "cpu" else torch.float32
    out = torch.empty(M, f.shape[1], dtype=dtype, device=f.device)
    for m in range(M):
        r = ref[m].to(dtype)
        r2 = (r * r).sum(dim=1)
        for i0 in range(0, f.shape[1], chunk_size):
            q = f[m, i0 : i0 + chunk_size].to(dtype)
            d2 = (q * q).sum(dim=1, keepdim=True) + r2.unsqueeze(0) - 2.0 * (q @ r.T)
            d, _ = torch.topk(d2.clamp_min_(0.0), kk, dim=1, largest=False)
            d = d.sqrt()
            if exclude_self:
                d = d[:, 1:]
            out[m, i0 : i0 + chunk_size] = torch.exp(-d.mean(dim=1))
    return out[0] if squeeze else out


def piece(
    logits: Any,
    labels: Any,
    features: Any = None,
    reference_features: Any = None,
    k: int = 5,
    n_bins: int = 10,
    *,
    proximity_bins: int = 10,
    proximities: Any = None,
    exclude_self: bool = False,
    convention: str = "standard",
    backend: str | None = None,
) -> torch.Tensor:
    """Proximity-informed ECE of M models (see the module docs).

    Args:
        logits: ``(M, N, C)`` or ``(N, C)``; labels: ``(N,)`` or ``(M, N)`` (as :func:`calibration`).
        features: ``(N, D)`` sample features (shared) or ``(M, N, D)`` (one set per model).
        reference_features: ``(R, D)`` or ``(M, R, D)``, e.g. the base-class validation features.
        k: neighbours for the proximity (DAC/DOR: 5).
        n_bins: equal-width confidence bins (DAC/DOR: 10); proximity_bins: equal-mass proximity bins (10).
        proximities: precomputed ``(N,)`` or ``(M, N)`` proximities instead of features (then features and
            reference_features must be None).
        exclude_self: see :func:`proximity`.
        convention: ``"standard"`` (equal-mass proximity bins by stable sort) or ``"dac"`` (scikit-learn quantile
            edges with linear percentiles, result in percent, as the DAC reference code).
        backend: backend of the ``calibration_bins`` op.

    Returns:
        ``(M,)`` float64 (0-d for 2-D logits).
    """
    n_bins = check_n_bins(n_bins)
    proximity_bins = check_n_bins(proximity_bins, "proximity_bins")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    logits, labels, n_bins, squeezed = check_inputs(logits, labels, n_bins)
    M, N, _ = logits.shape
    if proximities is not None:
        if features is not None or reference_features is not None:
            raise ValueError("proximities: give either proximities or features + reference_features, not both")
        prox = as_tensor(proximities, "proximities").to(logits.device)
        if not prox.is_floating_point():
            raise TypeError(f"proximities: expected a floating tensor, got {prox.dtype}")
        if prox.dim() == 1:
            prox = prox.unsqueeze(0).expand(M, -1)
        if tuple(prox.shape) != (M, N):
            raise ValueError(f"proximities: expected shape ({N},) or ({M}, {N}), got {tuple(prox.shape)}")
        if not bool(torch.isfinite(prox).all()):
            raise ValueError("proximities: expected finite values")
    else:
        if features is None or reference_features is None:
            raise ValueError("features and reference_features: both are required (or pass proximities)")
        f = as_tensor(features, "features")
        f = _check_features(f, "features", M, N)
        if f.device != logits.device:
            raise ValueError(f"features: expected on the logits' device {logits.device}, got {f.device}")
        prox = proximity(f if f.shape[0] > 1 else f[0], reference_features, k, exclude_self=exclude_self)
        if prox.dim() == 1:
            prox = prox.unsqueeze(0).expand(M, -1)

    stats = run_calibration_bins(logits, labels, n_bins, True, backend, squeezed)
    conf, correct = stats.confidence, stats.correct
    cb = torch.floor(conf.to(torch.float64) * n_bins).long().clamp_(0, n_bins - 1)
    out = torch.empty(M, dtype=torch.float64, device=logits.device)
    for m in range(M):
        if convention == "dac":
            pb = quantile_bins(prox[m], proximity_bins)
        else:  # equal-mass: stable sort of the proximities, cut into near-equal groups
            pb = torch.empty(N, dtype=torch.int64, device=prox.device)
            pb[torch.sort(prox[m], stable=True).indices] = equal_mass_ids(N, proximity_bins, prox.device)
        key = pb * n_bins + cb[m]
        out[m] = weighted_error(*group_sums(key, correct[m], conf[m], int(key.max()) + 1), N)
    if convention == "dac":
        out = out * 100.0
    return out[0] if squeezed else out


__all__ = ["piece", "proximity"]
