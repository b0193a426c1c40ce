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

from vlmfast.metrics.binning import binned_errors, gaps, group_sums, quantile_bins, weighted_error
from vlmfast.ops.calibration_bins import CalibrationBins, check_inputs, check_n_bins, run_calibration_bins
from vlmfast.ops.equal_mass_bins import equal_mass_bins

BINNINGS = ("width", "mass")
CONVENTIONS = ("standard", "dac")
_SCALED = ("ece", "ace", "mce", "mce_weighted", "rmsce", "ece_per_batch", "accuracy")


@dataclass
class CalibrationResult:
    """Calibration metrics of M models. Scalars have shape ``(M,)`` (0-d for 2-D logits), bins ``(M, n_bins)``
    (``(n_bins,)`` for 2-D logits). ``bin_confidence``/``bin_accuracy`` are NaN for empty bins. ``ece`` is the
    global (dataset-level) ECE; ``ece_per_batch`` is CaRot's per-batch average, present only when requested.
    ``backend`` is the backend of the logits pass; ``backends`` names the backend of every step
    (``calibration_bins``, and ``equal_mass_bins`` when equal-mass bins were computed), and ``notes`` says why a
    forced backend was not used for a step that it does not implement. A result never shares storage with the
    state of a :class:`CalibrationError`.
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
    backends: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = field(
        default=("ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier", "accuracy", "confidence"), repr=False
    )

    @property
    def n_models(self) -> int:
        return 1 if self.ece.dim() == 0 else int(self.ece.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists per model), e.g. for JSON or a database row. Strict-JSON safe: NaN (empty
        bins) and infinities become None."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "metric_names":
                continue
            if isinstance(v, torch.Tensor):
                v = _finite_or_none(v.tolist())
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
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


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return v


_SUMS = ("bin_count", "bin_correct", "bin_conf_sum", "saturated_count", "saturated_correct", "nll_sum", "brier_sum")


@dataclass
class _State:
    """What calibration needs from the data: the op's sums plus, optionally, per-sample confidence/correctness
    (kept as a list of chunks, concatenated when computed)."""

    stats: CalibrationBins
    confidence: list[torch.Tensor] = field(default_factory=list)  # (M, n) float32 chunks
    correct: list[torch.Tensor] = field(default_factory=list)  # (M, n) bool chunks

    def add(self, other: CalibrationBins) -> None:
        """Merge the sums of another pass in place (the state stays O(M * n_bins))."""
        for name in _SUMS:
            getattr(self.stats, name).add_(getattr(other, name))
        self.stats.n_samples += other.n_samples

    def samples(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.confidence:
            return None, None
        if len(self.confidence) > 1:  # consolidate, so that later computes do not concatenate again
            self.confidence = [torch.cat(self.confidence, dim=1)]
            self.correct = [torch.cat(self.correct, dim=1)]
        return self.confidence[0], self.correct[0]


def _update(logits: Any, labels: Any, n_bins: int, store_samples: bool, backend: str | None,
            validate_args: bool = True) -> tuple[CalibrationBins, bool, int]:
    logits, labels, n_bins, squeezed = check_inputs(logits, labels, n_bins)
    stats = run_calibration_bins(logits, labels, n_bins, store_samples, backend, squeezed, validate_args)
    return stats, squeezed, int(logits.shape[2])


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
    conf, correct = state.samples()
    if conf is None and (binning == "mass" or per_batch is not None):
        raise ValueError("binning='mass' and per_batch need per-sample statistics (store_samples=True)")
    backends = {"calibration_bins": st.backend}
    notes: list[str] = []

    def mass_sums():
        sums, name, note = equal_mass_bins(conf, correct, n_bins, backend=backend, strict=False)
        backends["equal_mass_bins"] = name
        if note:
            notes.append(note)
        return sums

    # Equal-width bins, standard convention (conf == 1.0 inside the last bin).
    ece, rmsce, mce, mce_w, bin_acc, bin_conf = binned_errors(st.bin_count, st.bin_correct, st.bin_conf_sum, N)
    bin_count = st.bin_count.clone()  # results never share storage with the state
    if convention == "dac":
        # DAC ECE: conf == 1.0 samples out of the last bin's means, still in its weight.
        count_m = st.bin_count.clone()
        corr_m = st.bin_correct.clone()
        csum_m = st.bin_conf_sum.clone()
        count_m[:, -1] -= st.saturated_count
        corr_m[:, -1] -= st.saturated_correct
        csum_m[:, -1] -= st.saturated_count.to(torch.float64)
        _, _, gap, _ = gaps(count_m, corr_m, csum_m)
        ece = (st.bin_count.to(torch.float64) / N * gap).sum(dim=1)  # weights from the full counts

    mass = None
    if conf is not None:
        if convention == "dac":
            ace = _dac_ace(conf, correct, n_bins)
        else:
            mass = mass_sums()
            ace = binned_errors(*mass, N)[0]
    else:
        ace = torch.full_like(ece, math.nan)

    if binning == "mass":
        if mass is None:
            mass = mass_sums()
        ece, rmsce, mce, mce_w, bin_acc, bin_conf = binned_errors(*mass, N)
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
        backends=backends,
        notes=tuple(notes),
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
    validate_args: bool = True,
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
        backend: force a backend (``triton``, ``cuda``, ``cpp``, ``torch``). The logits pass must run on it (else
            :class:`vlmfast.BackendError`); the equal-mass step runs on it when it implements that step, else on
            the default backend, and ``result.notes`` says so.
        validate_args: check label values and finite logits (one host sync after the pass). ``False`` skips the
            sync; rows with NaN/inf logits or labels outside ``[0, C)`` are then left out of the metrics.

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
    stats, squeezed, _ = _update(logits, labels, n_bins, True, backend, bool(validate_args))
    state = _State(stats, [stats.confidence], [stats.correct])
    return _compute(state, binning, convention, per_batch, squeezed, backend)


class CalibrationError:
    """Streaming calibration metrics: ``update(logits, labels)`` over sample chunks, then ``compute()``.

    Chunks add samples (along N) for the same M models. ``compute()`` equals :func:`calibration` on the
    concatenated input: counts, ``ace``, ``mce`` and per-batch ECE exactly (they come from the same per-sample
    values), sums up to float64 rounding (bitwise equal in practice: confidences >= 1/C sum exactly in float64
    for N < 2^20 when C <= 1024). Each ``update`` merges its sums into the state, so with ``store_samples=False``
    the state is O(M * n_bins) however many chunks arrive (and ``ace`` is NaN: equal-mass bins need every
    confidence; ``binning="mass"`` and ``per_batch`` then fail); with ``store_samples=True`` it also keeps the
    O(M * N) per-sample confidences and correctness. Results never share storage with the state.
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
        validate_args: bool = True,
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
        self.validate_args = bool(validate_args)
        self.reset()

    def reset(self) -> None:
        self._state: _State | None = None
        self._squeezed: bool | None = None
        self._models: int | None = None
        self._classes: int | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self._state is None else self._state.stats.n_samples

    def update(self, logits: Any, labels: Any) -> None:
        stats, squeezed, C = _update(logits, labels, self.n_bins, self.store_samples, self.backend,
                                     self.validate_args)
        M = stats.bin_count.shape[0]
        if self._state is not None:
            if squeezed != self._squeezed or M != self._models:
                want = "(N, C)" if self._squeezed else f"({self._models}, N, C)"
                raise ValueError(f"logits: expected chunks shaped {want} like the first update, got M = {M}")
            if C != self._classes:
                raise ValueError(f"logits: expected C = {self._classes} classes like the first update, got {C}")
            self._state.add(stats)
        else:
            self._squeezed, self._models, self._classes = squeezed, M, C
            self._state = _State(stats)
        if self.store_samples:
            self._state.confidence.append(stats.confidence)
            self._state.correct.append(stats.correct)

    def compute(self) -> CalibrationResult:
        if self._state is None:
            raise ValueError("compute: no samples; call update(logits, labels) first")
        return _compute(self._state, self.binning, self.convention, self.per_batch, bool(self._squeezed),
                        self.backend)

    def __repr__(self) -> str:
        return (
            f"CalibrationError(n_bins={self.n_bins}, binning={self.binning!r}, convention={self.convention!r}, "
            f"per_batch={self.per_batch}, store_samples={self.store_samples}, n_samples={self.n_samples})"
        )


def _heads_inputs(image_features: Any, head_weights: Any, logit_scale: Any, labels: Any):
    """Validate :func:`calibration_from_features` inputs (metadata only); returns ``(x (M|1, N, D), w (M, C, D),
    s (M,), labels (N,), squeezed)``."""
    from vlmfast.ops.calibration_bins import as_tensor

    x = as_tensor(image_features, "image_features")
    w = as_tensor(head_weights, "head_weights")
    for name, t in (("image_features", x), ("head_weights", w)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
    squeezed = w.dim() == 2
    if squeezed:
        w = w.unsqueeze(0)
    if w.dim() != 3:
        raise ValueError(f"head_weights: expected shape (C, D) or (M, C, D), got {tuple(w.shape)}")
    M, C, D = w.shape
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] not in (1, M) or x.shape[2] != D:
        raise ValueError(f"image_features: expected shape (N, {D}) or ({M}, N, {D}) for head_weights "
                         f"{tuple(w.shape)}, got {tuple(image_features.shape)}")
    if x.device != w.device:
        raise ValueError(f"head_weights: expected on the image features' device {x.device}, got {w.device}")
    N = x.shape[1]
    if M == 0 or N == 0 or C == 0 or D == 0:
        raise ValueError(f"image_features/head_weights: expected M, N, C, D >= 1, got M = {M}, N = {N}, C = {C}, "
                         f"D = {D}")
    s = as_tensor(logit_scale, "logit_scale")
    if not s.is_floating_point():
        raise TypeError(f"logit_scale: expected float multipliers, got {s.dtype}")
    s = s.to(device=x.device, dtype=torch.float32).reshape(-1)
    if s.numel() == 1:
        s = s.expand(M)
    if s.numel() != M:
        raise ValueError(f"logit_scale: expected a scalar or shape ({M},) (one multiplier per head), got "
                         f"{tuple(torch.as_tensor(logit_scale).shape)}")
    y = as_tensor(labels, "labels")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels: expected an integer tensor, got {y.dtype}")
    if tuple(y.shape) != (N,):
        raise ValueError(f"labels: expected shape ({N},) to match image_features, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"labels: expected on the features' device {x.device}, got {y.device}")
    return x, w, s, y, squeezed


def calibration_from_features(
    image_features: Any,
    head_weights: Any,
    logit_scale: Any,
    labels: Any,
    n_bins: int = 15,
    *,
    binning: str = "width",
    convention: str = "standard",
    per_batch: int | None = None,
    backend: str | None = None,
    validate_args: bool = True,
    chunk_elems: int = 1 << 22,
) -> CalibrationResult:
    """Calibration of M classifier heads on one backbone straight from features: the :func:`calibration` of the
    logits ``logit_scale[m] * normalize(image_features) @ normalize(head_weights[m]).T`` without the
    ``(M, N, C)`` logits ever existing.

    Args:
        image_features: ``(N, D)`` shared by all heads (one backbone), or ``(M, N, D)``; unnormalized.
        head_weights: ``(M, C, D)`` class text features of M heads (e.g. M prompt-tuned learners), or ``(C, D)``
            for one head (the result then has no model dimension); unnormalized.
        logit_scale: ``(M,)`` multipliers (``model.logit_scale.exp()``), or one for all.
        labels: ``(N,)`` class ids.
        n_bins, binning, convention, per_batch, backend, validate_args: as :func:`calibration` (``backend``
            chooses the calibration pass's backend).
        chunk_elems: the largest logits block held at once (heads x rows x C); peak extra memory is about
            ``4 * chunk_elems`` bytes plus the per-sample confidence/correctness ``(M, N)``.

    The features are normalized once (float32; float64 stays float64); the logits are produced block by block by
    a batched GEMM and go straight into the ``calibration_bins`` pass; the sums are merged exactly and the
    per-sample statistics concatenated, so the result equals :func:`calibration` on the materialised logits to
    float32 rounding of the GEMM.
    """
    n_bins = _validate_options(n_bins, binning, convention, per_batch)
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems: expected an int >= 1, got {chunk_elems!r}")
    x, w, s, y, squeezed = _heads_inputs(image_features, head_weights, logit_scale, labels)
    M, C, D = w.shape
    N = x.shape[1]
    dt = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    xn = torch.nn.functional.normalize(x.to(dt), dim=-1)
    wn = torch.nn.functional.normalize(w.to(dt), dim=-1)
    shared = xn.shape[0] == 1
    per_head = N * C
    if per_head <= chunk_elems:
        heads, rows = max(1, min(M, chunk_elems // per_head)), N
    else:
        heads, rows = 1, max(1, chunk_elems // C)
    y2 = y.to(torch.int64)
    parts: list[_State] = []
    for h0 in range(0, M, heads):
        h1 = min(M, h0 + heads)
        state: _State | None = None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            xs = xn[:, r0:r1].expand(h1 - h0, -1, -1) if shared else xn[h0:h1, r0:r1]
            z = torch.bmm(xs, wn[h0:h1].transpose(1, 2))
            z.mul_(s[h0:h1].to(dt).view(-1, 1, 1))
            lab = y2[r0:r1].unsqueeze(0).expand(h1 - h0, -1)
            stats = run_calibration_bins(z, lab, n_bins, True, backend, False, bool(validate_args))
            if state is None:
                state = _State(stats, [stats.confidence], [stats.correct])
            else:
                state.add(stats)
                state.confidence.append(stats.confidence)
                state.correct.append(stats.correct)
        parts.append(state)  # type: ignore[arg-type]
    merged = _merge_heads(parts)
    return _compute(merged, binning, convention, per_batch, squeezed, backend)


def _merge_heads(parts: list[_State]) -> _State:
    """Stack the states of consecutive head blocks along the model dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0].stats
    cat = {name: torch.cat([getattr(p.stats, name) for p in parts]) for name in _SUMS}
    n_invalid = torch.cat([p.stats.n_invalid for p in parts]) if first.n_invalid is not None else None
    stats = CalibrationBins(n_bins=first.n_bins, n_samples=first.n_samples, **cat, backend=first.backend,
                            n_invalid=n_invalid)
    samples = [p.samples() for p in parts]
    return _State(stats, [torch.cat([c for c, _ in samples])], [torch.cat([k for _, k in samples])])
