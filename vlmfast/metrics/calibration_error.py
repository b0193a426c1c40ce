"""Calibration metrics for many models at once: ECE, ACE, MCE (both forms), RMSCE, NLL, Brier.

One pass over ``(M, N, C)`` logits (the op :func:`vlmfast.ops.calibration_bins.calibration_bins`, on the fastest
backend available) gives every metric for all M models; nothing loops over models in Python.

Definitions (N samples of one model, confidence ``conf_i = max_c softmax(x_i)_c``, prediction
``argmax_c x_ic`` with ties to the lowest index, ``acc_i = [prediction == label]``; bin b holds ``n_b`` samples
with mean accuracy ``acc_b`` and mean confidence ``conf_b``):

=================  ===========================================================================================
``ece``            sum_b (n_b / N) |acc_b - conf_b|                 (equal-width bins, torchmetrics ``norm="l1"``)
``rmsce``          sqrt(sum_b (n_b / N) (acc_b - conf_b)^2)         (torchmetrics ``norm="l2"``)
``mce``            max_b |acc_b - conf_b| over non-empty bins       (torchmetrics ``norm="max"``)
``mce_weighted``   max_b (n_b / N) |acc_b - conf_b|                 (the DAC / DOR papers' "MCE")
``ace``            as ``ece`` over equal-mass bins (adaptive ECE)
``nll``            mean of logsumexp(x_i) - x_{i, y_i}
``brier``          mean of sum_c p_ic^2 - 2 p_{i y_i} + 1           (multi-class Brier, in [0, 2])
``accuracy``       mean of acc_i;   ``confidence``: mean of conf_i
=================  ===========================================================================================

**Equal-width bins** are ``[b/n, (b+1)/n)`` with exact edges, the last one closed: a confidence of exactly 1.0 (a
saturated softmax) lands in the last bin. **Equal-mass bins** (``ace``, and every binned metric when
``binning="mass"``): per model the confidences are sorted (stable) and cut into ``n_bins`` contiguous groups whose
sizes differ by at most one (the first ``N mod n_bins`` groups are larger), as ``torch.tensor_split`` does.

**Conventions.** ``convention="standard"`` is the above. ``convention="dac"`` reproduces the reference code of
the DAC and DOR papers (ml-stat-Sustech/CLIP_Calibration ``tools/metrics.py``) so that their tables can be
compared: samples with confidence exactly 1.0 are left out of the last bin's means in ``ece`` but still counted
in its weight; ``ace`` bins by linear-interpolated percentile edges (scikit-learn ``KBinsDiscretizer(
strategy="quantile")`` as of its ``linear`` quantile method), merging bins narrower than 1e-8; calibration errors
and accuracy are reported in percent (x100). NLL, Brier and confidence are never rescaled.

**Global vs per-batch ECE.** ``ece`` is always the dataset-level (global) ECE. CaRot's reference code instead
computes ECE on each evaluation batch of 512 and averages it weighted by batch size; ``per_batch=512`` adds that
number as ``ece_per_batch`` (consecutive batches in the order given; each batch is binned with the convention's
equal-width bins). The two differ — report which one you quote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from vlmfast.ops.calibration_bins import (
    CalibrationBins,
    check_inputs,
    check_n_bins,
    equal_mass_sums,
    group_sums,
    run_calibration_bins,
)

BINNINGS = ("width", "mass")
CONVENTIONS = ("standard", "dac")
_SCALED = ("ece", "ace", "mce", "mce_weighted", "rmsce", "ece_per_batch", "accuracy")


@dataclass
class CalibrationResult:
    """Calibration metrics of M models. Scalars have shape ``(M,)`` (0-d for 2-D logits), bins ``(M, n_bins)``
    (``(n_bins,)`` for 2-D logits). ``bin_confidence``/``bin_accuracy`` are NaN for empty bins. ``ece`` is the
    global (dataset-level) ECE; ``ece_per_batch`` is CaRot's per-batch average, present only when requested.
    """

    ece: torch.Tensor
    ace: torch.Tensor
    mce: torch.Tensor
    mce_weighted: torch.Tensor
    rmsce: torch.Tensor
    nll: torch.Tensor
    brier: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor
    bin_count: torch.Tensor
    bin_confidence: torch.Tensor
    bin_accuracy: torch.Tensor
    n_bins: int
    n_samples: int
    binning: str = "width"
    convention: str = "standard"
    per_batch: int | None = None
    ece_per_batch: torch.Tensor | None = None
    backend: str = "torch"
    metric_names: tuple[str, ...] = field(
        default=("ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier", "accuracy", "confidence"), repr=False
    )

    @property
    def n_models(self) -> int:
        return 1 if self.ece.dim() == 0 else int(self.ece.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists per model), e.g. for JSON or a database row."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "metric_names":
                continue
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out

    def table(self, model_names: Sequence[str] | None = None, digits: int = 4) -> str:
        """A markdown table, one row per model."""
        names = list(model_names) if model_names is not None else [f"model {i}" for i in range(self.n_models)]
        if len(names) != self.n_models:
            raise ValueError(f"model_names: expected {self.n_models} names, got {len(names)}")
        cols = list(self.metric_names) + (["ece_per_batch"] if self.ece_per_batch is not None else [])
        header = "| model | " + " | ".join(cols) + " |"
        sep = "|---|" + "---|" * len(cols)
        rows = [header, sep]
        for i, name in enumerate(names):
            vals = []
            for c in cols:
                t = getattr(self, c)
                v = float(t) if t.dim() == 0 else float(t[i])
                vals.append(f"{v:.{digits}f}")
            rows.append(f"| {name} | " + " | ".join(vals) + " |")
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# _validate -> _update -> _compute
# ----------------------------------------------------------------------------------------------------------


def _validate_options(n_bins: Any, binning: Any, convention: Any, per_batch: Any) -> int:
    n_bins = check_n_bins(n_bins)
    if binning not in BINNINGS:
        raise ValueError(f"binning: expected one of {BINNINGS}, got {binning!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if per_batch is not None:
        if isinstance(per_batch, bool) or not isinstance(per_batch, int):
            raise TypeError(f"per_batch: expected an int or None, got {type(per_batch).__name__}")
        if per_batch < 1:
            raise ValueError(f"per_batch: expected >= 1, got {per_batch}")
    return n_bins


@dataclass
class _State:
    """What calibration needs from the data: the op's sums plus, optionally, per-sample confidence/correctness."""

    stats: CalibrationBins
    confidence: torch.Tensor | None  # (M, N) float32
    correct: torch.Tensor | None  # (M, N) bool

    @classmethod
    def merge(cls, parts: list["_State"]) -> "_State":
        first = parts[0].stats
        if len(parts) == 1:
            return parts[0]

        def total(name: str) -> torch.Tensor:
            out = getattr(first, name).clone()
            for p in parts[1:]:
                out += getattr(p.stats, name)
            return out

        stats = CalibrationBins(
            n_bins=first.n_bins,
            n_samples=sum(p.stats.n_samples for p in parts),
            bin_count=total("bin_count"),
            bin_correct=total("bin_correct"),
            bin_conf_sum=total("bin_conf_sum"),
            saturated_count=total("saturated_count"),
            saturated_correct=total("saturated_correct"),
            nll_sum=total("nll_sum"),
            brier_sum=total("brier_sum"),
            backend=first.backend,
        )
        have = all(p.confidence is not None for p in parts)
        conf = torch.cat([p.confidence for p in parts], dim=1) if have else None
        corr = torch.cat([p.correct for p in parts], dim=1) if have else None
        return cls(stats, conf, corr)


def _update(logits: Any, labels: Any, n_bins: int, store_samples: bool, backend: str | None) -> tuple[_State, bool, int]:
    logits, labels, n_bins, squeezed = check_inputs(logits, labels, n_bins)
    stats = run_calibration_bins(logits, labels, n_bins, store_samples, backend, squeezed)
    return _State(stats, stats.confidence, stats.correct), squeezed, int(logits.shape[2])


def _gaps(count: torch.Tensor, correct: torch.Tensor, conf_sum: torch.Tensor):
    """Per-bin mean accuracy and confidence (NaN where empty) and |acc - conf| (0 where empty)."""
    countf = count.to(torch.float64)
    nonempty = count > 0
    denom = torch.where(nonempty, countf, torch.ones_like(countf))
    acc = torch.where(nonempty, correct.to(torch.float64) / denom, torch.full_like(countf, math.nan))
    conf = torch.where(nonempty, conf_sum / denom, torch.full_like(countf, math.nan))
    gap = torch.where(nonempty, (acc - conf).abs(), torch.zeros_like(countf))
    return acc, conf, gap, nonempty


def weighted_error(count, correct, conf_sum, n_total: int) -> torch.Tensor:
    """sum over groups (last dim) of (n_g / n_total) |acc_g - conf_g| (empty groups contribute 0)."""
    _, _, gap, _ = _gaps(count, correct, conf_sum)
    return (count.to(torch.float64) / n_total * gap).sum(dim=-1)


def _binned_errors(count, correct, conf_sum, n_total: int):
    acc, conf, gap, nonempty = _gaps(count, correct, conf_sum)
    w = count.to(torch.float64) / n_total
    ece = (w * gap).sum(dim=1)
    rmsce = torch.sqrt((w * gap * gap).sum(dim=1))
    mce = torch.where(nonempty, gap, torch.full_like(gap, -1.0)).amax(dim=1).clamp_min(0.0)
    mce_weighted = (w * gap).amax(dim=1)
    return ece, rmsce, mce, mce_weighted, acc, conf


def _percentile_linear(sorted_vals: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
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
    edges = _percentile_linear(s, levels)
    keep = torch.ones_like(edges, dtype=torch.bool)
    keep[1:] = (edges[1:] - edges[:-1]) > 1e-8
    edges = edges[keep]
    return torch.searchsorted(edges[1:-1].contiguous(), v.contiguous(), right=True)


def _dac_ace(conf: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    M, N = conf.shape
    out = torch.empty(M, dtype=torch.float64, device=conf.device)
    for m in range(M):
        b = quantile_bins(conf[m], n_bins)
        out[m] = weighted_error(*group_sums(b, correct[m], conf[m], int(b.max()) + 1), N)
    return out


def _per_batch_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, per_batch: int) -> torch.Tensor:
    """CaRot-style ECE: ECE of each consecutive batch of ``per_batch`` samples, averaged weighted by batch size."""
    M, N = conf.shape
    n_batches = -(-N // per_batch)
    b = torch.floor(conf.to(torch.float64) * n_bins).long().clamp_(0, n_bins - 1)
    batch = (torch.arange(N, device=conf.device) // per_batch).unsqueeze(0).expand(M, N)
    # sum over batches of (n_batch / N) * sum_b (n_b / n_batch) gap_b  =  sum over (batch, bin) of (n_b / N) gap_b
    return weighted_error(*group_sums(batch * n_bins + b, correct, conf, n_batches * n_bins), N)


def _compute(
    state: _State, binning: str, convention: str, per_batch: int | None, squeezed: bool, backend: str | None = None
) -> CalibrationResult:
    st = state.stats
    n_bins, N = st.n_bins, st.n_samples
    conf, correct = state.confidence, state.correct
    if conf is None and (binning == "mass" or per_batch is not None):
        raise ValueError("binning='mass' and per_batch need per-sample statistics (store_samples=True)")

    # Equal-width bins, standard convention (conf == 1.0 inside the last bin).
    ece, rmsce, mce, mce_w, bin_acc, bin_conf = _binned_errors(st.bin_count, st.bin_correct, st.bin_conf_sum, N)
    bin_count = st.bin_count
    if convention == "dac":
        # DAC ECE: conf == 1.0 samples out of the last bin's means, still in its weight.
        count_m = st.bin_count.clone()
        corr_m = st.bin_correct.clone()
        csum_m = st.bin_conf_sum.clone()
        count_m[:, -1] -= st.saturated_count
        corr_m[:, -1] -= st.saturated_correct
        csum_m[:, -1] -= st.saturated_count.to(torch.float64)
        _, _, gap, _ = _gaps(count_m, corr_m, csum_m)
        ece = (st.bin_count.to(torch.float64) / N * gap).sum(dim=1)  # weights from the full counts

    mass = None
    if conf is not None:
        if convention == "dac":
            ace = _dac_ace(conf, correct, n_bins)
        else:
            mass = equal_mass_sums(conf, correct, n_bins, backend=backend)
            ace = _binned_errors(*mass, N)[0]
    else:
        ace = torch.full_like(ece, math.nan)

    if binning == "mass":
        if mass is None:
            mass = equal_mass_sums(conf, correct, n_bins, backend=backend)
        ece, rmsce, mce, mce_w, bin_acc, bin_conf = _binned_errors(*mass, N)
        bin_count = mass[0]

    ece_pb = _per_batch_ece(conf, correct, n_bins, per_batch) if per_batch is not None else None

    n_correct = st.bin_correct.sum(dim=1).to(torch.float64)
    values = {
        "ece": ece,
        "ace": ace,
        "mce": mce,
        "mce_weighted": mce_w,
        "rmsce": rmsce,
        "nll": st.nll_sum / N,
        "brier": st.brier_sum / N,
        "accuracy": n_correct / N,
        "confidence": st.bin_conf_sum.sum(dim=1) / N,
        "ece_per_batch": ece_pb,
    }
    if convention == "dac":
        for k in _SCALED:
            if values[k] is not None:
                values[k] = values[k] * 100.0
    bins = {"bin_count": bin_count, "bin_confidence": bin_conf, "bin_accuracy": bin_acc}
    if squeezed:
        values = {k: (v[0] if v is not None else None) for k, v in values.items()}
        bins = {k: v[0] for k, v in bins.items()}
    return CalibrationResult(
        **values,
        **bins,
        n_bins=n_bins,
        n_samples=N,
        binning=binning,
        convention=convention,
        per_batch=per_batch,
        backend=st.backend,
    )


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def calibration(
    logits: Any,
    labels: Any,
    n_bins: int = 15,
    *,
    binning: str = "width",
    convention: str = "standard",
    per_batch: int | None = None,
    backend: str | None = None,
) -> CalibrationResult:
    """All calibration metrics of M models in one pass (see the module docs for every definition).

    Args:
        logits: ``(M, N, C)`` logits of M models on the same N samples, or ``(N, C)`` for one model; float32,
            float16, bfloat16 or float64; CPU or CUDA; any strides. (Holding probabilities? pass their log.)
        labels: ``(N,)`` shared by all models, or ``(M, N)``; integers in ``[0, C)``.
        n_bins: number of bins (default 15, as torchmetrics; the DAC/DOR papers use 10, CaRot 10).
        binning: ``"width"`` (equal-width bins for ece/mce/rmsce and the ``bin_*`` arrays) or ``"mass"``
            (equal-mass bins for all of them). ``ace`` always uses equal-mass bins.
        convention: ``"standard"`` or ``"dac"`` (DAC/DOR reference quirks, values in percent).
        per_batch: also compute CaRot's per-batch ECE over consecutive batches of this size (``ece_per_batch``);
            ``ece`` stays the global ECE.
        backend: force a backend of the ``calibration_bins`` op (``triton``, ``cuda``, ``cpp``, ``torch``).

    Returns:
        :class:`CalibrationResult`: tensors of shape ``(M,)`` (0-d for 2-D logits) and ``(M, n_bins)`` bins.

    Example:
        >>> import torch, vlmfast
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]]])
        >>> r = vlmfast.metrics.calibration(logits, torch.tensor([0, 1, 1, 1]), n_bins=5, backend="torch")
        >>> [round(v, 4) for v in r.accuracy.tolist()]
        [0.75]
    """
    n_bins = _validate_options(n_bins, binning, convention, per_batch)
    state, squeezed, _ = _update(logits, labels, n_bins, True, backend)
    return _compute(state, binning, convention, per_batch, squeezed, backend)


class CalibrationError:
    """Streaming calibration metrics: ``update(logits, labels)`` over sample chunks, then ``compute()``.

    Chunks add samples (along N) for the same M models. ``compute()`` equals :func:`calibration` on the
    concatenated input: counts, ``ace``, ``mce`` and per-batch ECE exactly (they come from the same per-sample
    values), sums up to float64 rounding (bitwise equal in practice: confidences >= 1/C sum exactly in float64
    for N < 2^20 when C <= 1024). With ``store_samples=False`` the state is O(M * n_bins) instead of O(M * N),
    and ``ace`` is NaN (equal-mass bins need every confidence); ``binning="mass"`` and ``per_batch`` then fail.
    """

    higher_is_better = False

    def __init__(
        self,
        n_bins: int = 15,
        *,
        binning: str = "width",
        convention: str = "standard",
        per_batch: int | None = None,
        store_samples: bool = True,
        backend: str | None = None,
    ) -> None:
        self.n_bins = _validate_options(n_bins, binning, convention, per_batch)
        if not isinstance(store_samples, bool):
            raise TypeError(f"store_samples: expected a bool, got {type(store_samples).__name__}")
        if not store_samples and (binning == "mass" or per_batch is not None):
            raise ValueError("store_samples=False cannot be combined with binning='mass' or per_batch")
        self.binning = binning
        self.convention = convention
        self.per_batch = per_batch
        self.store_samples = store_samples
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self._parts: list[_State] = []
        self._squeezed: bool | None = None
        self._models: int | None = None
        self._classes: int | None = None

    @property
    def n_samples(self) -> int:
        return sum(p.stats.n_samples for p in self._parts)

    def update(self, logits: Any, labels: Any) -> None:
        state, squeezed, C = _update(logits, labels, self.n_bins, self.store_samples, self.backend)
        M = state.stats.bin_count.shape[0]
        if self._parts:
            if squeezed != self._squeezed or M != self._models:
                want = "(N, C)" if self._squeezed else f"({self._models}, N, C)"
                raise ValueError(f"logits: expected chunks shaped {want} like the first update, got M = {M}")
            if C != self._classes:
                raise ValueError(f"logits: expected C = {self._classes} classes like the first update, got {C}")
        else:
            self._squeezed, self._models, self._classes = squeezed, M, C
        self._parts.append(state)

    def compute(self) -> CalibrationResult:
        if not self._parts:
            raise ValueError("compute: no samples; call update(logits, labels) first")
        return _compute(
            _State.merge(self._parts), self.binning, self.convention, self.per_batch, bool(self._squeezed), self.backend
        )

    def __repr__(self) -> str:
        return (
            f"CalibrationError(n_bins={self.n_bins}, binning={self.binning!r}, convention={self.convention!r}, "
            f"per_batch={self.per_batch}, store_samples={self.store_samples}, n_samples={self.n_samples})"
        )
