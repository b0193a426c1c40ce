"""The op ``calibration_bins``: calibration sufficient statistics for M models x N samples in one pass.

For logits ``(M, N, C)`` (or ``(N, C)``) and labels ``(N,)`` shared by all models (or ``(M, N)``), every backend
computes per row, with the softmax taken on the fly (online max; the ``(M, N, C)`` probabilities never exist):

* confidence ``conf = max_c p_c`` and prediction ``argmax_c x_c`` (ties go to the lowest class index, as
  ``torch.argmax``), correct = prediction == label;
* NLL ``logsumexp(x) - x_y`` and Brier ``sum_c p_c^2 - 2 p_y + 1``, in float32 (float64 for float64 logits);

and accumulates per model and confidence bin: the count, the sum of confidences and the number correct; per
model: the sums of NLL and Brier. Optionally it also returns the per-sample confidence and correctness
``(M, N)``, which equal-mass bins (ACE), per-batch ECE and PIECE need. Rows with a NaN/inf logit or a label
outside ``[0, C)`` are left out of every sum and counted in ``n_invalid``; with ``validate_args=True`` (the
default) any such row raises a ``ValueError`` naming the model, sample (and class) after the pass — one host
sync per call, none with ``validate_args=False``.

**Bins.** ``n_bins`` equal-width bins on [0, 1]: bin ``b`` holds ``b/n_bins <= conf < (b+1)/n_bins`` with exact
real-number edges (``floor(conf * n_bins)`` evaluated in float64), except the last, which is closed,
``[1 - 1/n_bins, 1]``: a confidence of exactly 1.0 (a saturated softmax) lands in the last bin. This equals
netcal and equals torchmetrics wherever torchmetrics is correct (torchmetrics puts conf == 1.0 in a hidden
extra bin). Such samples are also counted apart in ``saturated_count``/``saturated_correct`` so that the DAC/DOR
reference convention (which leaves them out of the bin means) can be reproduced.

**Layers** (the op-layer template, ``docs/adding_an_op.md``): backend forwards registered with
:mod:`vlmfast._dispatch` — ``triton`` (``kernels/calibration_bins.py``), ``cuda`` (``csrc/cuda/calibration_bins.cu``),
``cpp`` (``csrc/calibration_bins.cpp``), ``torch`` (:func:`calibration_bins_ref`, the oracle) — behind the
``torch.library`` op ``torch.ops.vlmfast.calibration_bins`` (with a fake implementation, so it runs inside
``torch.compile(fullgraph=True)``), behind the functional :func:`calibration_bins`. The op is not differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view

OP = "calibration_bins"
MAX_BINS = 1 << 20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _probe(device: str) -> dict[str, Any]:
    return {"logits": torch.empty(1, 1, 2, device=device), "n_bins": 15}


_dispatch.define_op(OP, device_arg="logits", probe=_probe, module=__name__)


@dataclass
class CalibrationBins:
    """Sufficient statistics of one :func:`calibration_bins` call. Shapes: M models, ``n_bins`` bins.

    ``bin_*`` follow the standard convention (last bin closed, conf == 1.0 inside it). ``confidence`` and
    ``correct`` are ``(M, N)`` when requested with ``return_samples=True``, else None (float64 for float64 logits,
    else float32). ``n_invalid`` counts the rows left out (NaN/inf logits or labels outside ``[0, C)``): always
    zero when the call validated its arguments, since such rows raise.
    """

    n_bins: int
    n_samples: int
    bin_count: torch.Tensor  # (M, n_bins) int64
    bin_correct: torch.Tensor  # (M, n_bins) int64
    bin_conf_sum: torch.Tensor  # (M, n_bins) float64
    saturated_count: torch.Tensor  # (M,) int64: samples with conf == 1.0 exactly (inside the last bin)
    saturated_correct: torch.Tensor  # (M,) int64
    nll_sum: torch.Tensor  # (M,) float64
    brier_sum: torch.Tensor  # (M,) float64
    confidence: torch.Tensor | None = None  # (M, N) float32 (float64 for float64 logits)
    correct: torch.Tensor | None = None  # (M, N) bool
    backend: str = "torch"
    n_invalid: torch.Tensor | None = None  # (M,) int64

    @property
    def n_correct(self) -> torch.Tensor:
        return self.bin_correct.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Validation (shared with vlmfast.metrics)
# ----------------------------------------------------------------------------------------------------------


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a tensor (array-likes converted), or a TypeError naming the argument."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:
        raise TypeError(f"{name}: expected a tensor or array-like, got {type(x).__name__} ({exc})") from None


def check_n_bins(n_bins: Any, name: str = "n_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        if isinstance(n_bins, torch.Tensor) and n_bins.numel() == 1 and not n_bins.is_floating_point():
            n_bins = int(n_bins.item())
        else:
            raise TypeError(f"{name}: expected an int, got {type(n_bins).__name__} ({n_bins!r})")
    if n_bins < 1 or n_bins > MAX_BINS:
        raise ValueError(f"{name}: expected 1 <= {name} <= {MAX_BINS}, got {n_bins}")
    return int(n_bins)


def check_inputs(logits: Any, labels: Any, n_bins: Any) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Validate shapes, dtypes and devices (no host sync) and normalise: returns ``(logits (M, N, C), labels
    (M, N) int32/int64, n_bins, squeezed)``. Label values and non-finite logits are checked after the pass, from
    the kernels' count of invalid rows (see :func:`raise_invalid`).

    ``squeezed`` is True for 2-D input (results then drop the model dimension). Labels shared by all models come
    back as an expanded (stride-0) view, not a copy.
    """
    n_bins = check_n_bins(n_bins)
    logits = as_tensor(logits, "logits")
    labels = as_tensor(labels, "labels")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape (N, C) or (M, N, C), got {tuple(logits.shape)}")
    if logits.device.type == "meta" or labels.device.type == "meta":
        raise ValueError("logits/labels: expected tensors with data (CPU or CUDA), got meta tensors")
    squeezed = logits.dim() == 2
    if squeezed:
        logits = logits.unsqueeze(0)
    M, N, C = logits.shape
    if M == 0 or N == 0 or C == 0:
        raise ValueError(f"logits: empty input, every dimension must be >= 1, got {tuple(logits.shape[int(squeezed):])}")
    if N >= 2**31:
        raise ValueError(f"logits: at most 2**31 - 1 samples per model, got N = {N}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels: expected on the logits' device {logits.device}, got {labels.device}")
    if labels.dim() == 1:
        if labels.shape[0] != N:
            raise ValueError(f"labels: expected shape ({N},) to match logits (N = {N}), got {tuple(labels.shape)}")
        labels = labels.unsqueeze(0).expand(M, N)
    elif labels.dim() == 2 and not squeezed:
        if tuple(labels.shape) != (M, N):
            raise ValueError(f"labels: expected shape ({N},) or ({M}, {N}), got {tuple(labels.shape)}")
    else:
        want = f"({N},)" if squeezed else f"({N},) or ({M}, {N})"
        raise ValueError(f"labels: expected shape {want}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        labels = labels.to(torch.int64)
    return logits, labels, n_bins, squeezed


def raise_invalid(logits: torch.Tensor, labels: torch.Tensor, invalid: torch.Tensor, squeezed: bool) -> None:
    """Raise the ValueError for rows the pass left out (``invalid`` (M,) > 0 somewhere): a label outside
    ``[0, C)`` first, else the first NaN/inf logit, naming the model, sample (and class)."""
    C = logits.shape[2]
    bad_label = (labels < 0) | (labels >= C)
    if bool(bad_label.any()):
        m, n = bad_label.nonzero()[0].tolist()
        where = f"sample {n}" if squeezed or labels.stride(0) == 0 else f"model {m}, sample {n}"
        raise ValueError(f"labels: expected values in [0, {C}) (C = {C} classes), got {int(labels[m, n])} at {where}")
    bad_models = invalid.nonzero().flatten().tolist()
    m = bad_models[0]
    rows = (~torch.isfinite(logits[m])).nonzero()
    n, c = rows[0].tolist()
    value = float(logits[m, n, c])
    where = f"sample {n}, class {c}" if squeezed else f"model {m}, sample {n}, class {c}"
    total = int(invalid.sum())
    raise ValueError(
        f"logits: expected finite values, got {value} at {where} ({total} row(s) with NaN or inf"
        + ("" if squeezed else f" in model(s) {bad_models[:10]}{'...' if len(bad_models) > 10 else ''}")
        + ")"
    )


# ----------------------------------------------------------------------------------------------------------
# Torch reference (also the CPU/GPU fallback and the test oracle)
# ----------------------------------------------------------------------------------------------------------


def _row_stats_ref(x: torch.Tensor, y: torch.Tensor):
    """Per-row statistics for logits ``x (..., C)`` and labels ``y (...)``, computed in float32 (float64 stays).

    The softmax sum is ``s = 1 + rest`` with ``rest`` the sum of ``exp(x_c - max)`` over every class but the
    argmax, so that ``conf = 1 / s`` rounds like an accurately summed softmax (float64, say) on
    near-saturated rows, whose small terms would each round away against the argmax's 1. NLL is
    ``(max - x_y) + log1p(rest)`` with the difference in float64 (it overflows float32 for finite logits such as
    3e38 and -3e38); Brier ``sum_c p_c^2 - 2 p_y + 1`` is ``((1 - e_y + rest)^2 + (1 - e_y^2 + rest2)) / s^2``
    with ``e_y = exp(x_y - max)``, which is ``(rest^2 + rest2) / s^2`` exactly when the label is the argmax
    (``e_y == 1``): no cancellation near saturation. Every backend computes these same formulas.
    """
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(xf).all(dim=-1)
    xf = torch.where(finite.unsqueeze(-1), xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
    pred = xf.argmax(dim=-1)
    mx = xf.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    e = torch.exp(xf - mx.unsqueeze(-1)).scatter_(-1, pred.unsqueeze(-1), 0.0)  # the argmax's 1 left out
    rest = e.sum(dim=-1)
    rest2 = (e * e).sum(dim=-1)
    s = 1.0 + rest
    xy = xf.gather(-1, y.unsqueeze(-1).long()).squeeze(-1)
    conf = 1.0 / s
    nll = (mx.double() - xy.double()) + torch.log1p(rest).double()
    ey = torch.exp(xy - mx)  # exactly 1 for the argmax
    brier = (((1.0 - ey) + rest).square() + ((1.0 - ey * ey) + rest2)) / (s * s)
    return conf, pred, nll, brier, finite


def _accumulate(
    conf: torch.Tensor, correct: torch.Tensor, nll, brier, finite, m_idx: torch.Tensor, n_bins: int, outs: dict
) -> None:
    nb1 = n_bins + 1
    b = torch.floor(conf.to(torch.float64) * n_bins).long().clamp_(0, n_bins)
    key = (m_idx * nb1 + b)[finite]
    ones = torch.ones_like(key)
    outs["bin_count"].view(-1).index_add_(0, key, ones)
    outs["bin_correct"].view(-1).index_add_(0, key, correct[finite].long())
    outs["bin_conf"].view(-1).index_add_(0, key, conf[finite].to(torch.float64))
    mf = m_idx[finite]
    outs["sums"][:, 0].index_add_(0, mf, nll[finite].to(torch.float64))
    outs["sums"][:, 1].index_add_(0, mf, brier[finite].to(torch.float64))
    outs["nonfinite"].index_add_(0, m_idx[~finite], torch.ones_like(m_idx[~finite]))


def _run_torch(logits: torch.Tensor, labels: torch.Tensor, n_bins: int, outs: dict, chunk_elems: int = 1 << 24):
    M, N, C = logits.shape
    rows_per_chunk = max(1, chunk_elems // C)
    for m in range(M):
        for n0 in range(0, N, rows_per_chunk):
            n1 = min(N, n0 + rows_per_chunk)
            x = logits[m, n0:n1]
            y = labels[m, n0:n1]
            y_ok = (y >= 0) & (y < C)  # rows with a label outside [0, C) are left out, as in the kernels
            y = torch.where(y_ok, y, torch.zeros((), dtype=y.dtype, device=y.device))
            conf, pred, nll, brier, finite = _row_stats_ref(x, y)
            finite = finite & y_ok
            correct = pred == y
            m_idx = torch.full((n1 - n0,), m, dtype=torch.long, device=logits.device)
            _accumulate(conf, correct, nll, brier, finite, m_idx, n_bins, outs)
            if outs.get("sample_conf") is not None:
                outs["sample_conf"][m, n0:n1] = torch.where(finite, conf, 0.0).to(outs["sample_conf"].dtype)
                outs["sample_correct"][m, n0:n1] = correct & finite


def calibration_bins_ref(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, return_samples: bool = False
) -> CalibrationBins:
    """Torch reference of :func:`calibration_bins` (same inputs and result); the oracle of the tests."""
    return calibration_bins(logits, labels, n_bins, return_samples=return_samples, backend="torch")


# ----------------------------------------------------------------------------------------------------------
# Backend forwards. All share one contract: zero-initialised output buffers, accumulated into. Device checks
# are the backends' own (vlmfast._dispatch); the checks here are the kernels' limits.
# ----------------------------------------------------------------------------------------------------------


def _check_cpp(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    return [] if logits.dtype in FLOAT_DTYPES else [f"dtype {logits.dtype} unsupported"]


def _check_cuda(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    reasons = []
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {logits.dtype} unsupported (float32, float16, bfloat16)")
    if n_bins > 4096:
        reasons.append(f"n_bins = {n_bins} > 4096 (bins live in shared memory)")
    return reasons


def _check_triton(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    reasons = []
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {logits.dtype} unsupported (float32, float16, bfloat16)")
    if n_bins > 1024:
        reasons.append(f"n_bins = {n_bins} > 1024 (bins are kept in registers)")
    return reasons


@_dispatch.register(OP, "torch")
def _calibration_bins_torch(logits, labels, n_bins, outs):
    _run_torch(logits, labels, n_bins, outs)


_OUT_NAMES = ("bin_count", "bin_correct", "bin_conf", "sums", "nonfinite", "sample_conf", "sample_correct")


def _views(logits, labels, n_bins, outs) -> list:
    """Positional arguments of the extension's calibration_bins entries (see csrc/bindings.cpp)."""
    return [tensor_view(logits), tensor_view(labels), n_bins] + [tensor_view(outs.get(k)) for k in _OUT_NAMES]


@_dispatch.register(OP, "cpp", _check_cpp)
def _calibration_bins_cpp(logits, labels, n_bins, outs):
    get_C().calibration_bins_cpu(*_views(logits, labels, n_bins, outs), torch.get_num_threads())


@_dispatch.register(OP, "cuda", _check_cuda)
def _calibration_bins_cuda(logits, labels, n_bins, outs):
    with torch.cuda.device(logits.device):
        stream = torch.cuda.current_stream(logits.device).cuda_stream
        get_C().calibration_bins_cuda(*_views(logits, labels, n_bins, outs), stream)


@_dispatch.register(OP, "triton", _check_triton, module="vlmfast.kernels.calibration_bins")
def _calibration_bins_triton(logits, labels, n_bins, outs):
    from vlmfast.kernels.calibration_bins import calibration_bins_forward

    calibration_bins_forward(logits, labels, n_bins, outs)


# ----------------------------------------------------------------------------------------------------------
# torch.library op: torch.ops.vlmfast.calibration_bins (dispatches inside; fake implementation for compile)
# ----------------------------------------------------------------------------------------------------------


def _buffer_sizes(M: int, n_bins: int) -> tuple[int, int]:
    nb1 = n_bins + 1
    return 2 * M * nb1 + M, M * nb1 + 2 * M  # int64: count, correct, invalid; float64: conf sums, nll/brier


def _carve(ints: Tensor, flts: Tensor, M: int, n_bins: int) -> dict[str, Tensor]:
    """The named views of the two output buffers (the layout the backends accumulate into)."""
    nb1 = n_bins + 1
    return {
        "bin_count": ints[: M * nb1].view(M, nb1),
        "bin_correct": ints[M * nb1 : 2 * M * nb1].view(M, nb1),
        "nonfinite": ints[2 * M * nb1 :],  # rows left out: NaN/inf logits or a label outside [0, C)
        "bin_conf": flts[: M * nb1].view(M, nb1),
        "sums": flts[M * nb1 :].view(M, 2),
    }


@torch.library.custom_op("vlmfast::calibration_bins", mutates_args=())
def _calibration_bins_op(
    logits: Tensor, labels: Tensor, n_bins: int, return_samples: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ints, flts, sample_conf, sample_correct)`` for validated ``(M, N, C)`` logits and ``(M, N)`` labels.

    ``ints`` (int64) and ``flts`` (float64) hold the bins and sums in the layout of :func:`_carve`; the samples are
    ``(M, N)`` (``(M, 0)`` when not requested). ``backend`` is a backend name, or ``""`` for the dispatcher's
    choice (and ``VLMFAST_BACKEND``)."""
    M, N, _ = logits.shape
    impl = _dispatch.select(OP, backend or None, logits=logits, n_bins=n_bins)
    n_int, n_flt = _buffer_sizes(M, n_bins)
    ints = torch.zeros(n_int, dtype=torch.int64, device=logits.device)
    flts = torch.zeros(n_flt, dtype=torch.float64, device=logits.device)
    outs: dict[str, Any] = _carve(ints, flts, M, n_bins)
    conf_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_s = N if return_samples else 0
    sample_conf = torch.zeros(M, n_s, dtype=conf_dtype, device=logits.device)
    sample_correct = torch.zeros(M, n_s, dtype=torch.bool, device=logits.device)
    outs["sample_conf"] = sample_conf if return_samples else None
    outs["sample_correct"] = sample_correct if return_samples else None
    impl.forward(logits, labels, n_bins, outs)
    return ints, flts, sample_conf, sample_correct


@_calibration_bins_op.register_fake
def _calibration_bins_fake(logits, labels, n_bins, return_samples, backend):
    M, N, _ = logits.shape
    n_int, n_flt = _buffer_sizes(M, n_bins)
    conf_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_s = N if return_samples else 0
    return (logits.new_empty(n_int, dtype=torch.int64), logits.new_empty(n_flt, dtype=torch.float64),
            logits.new_empty(M, n_s, dtype=conf_dtype), logits.new_empty(M, n_s, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def run_calibration_bins(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int,
    return_samples: bool,
    backend: str | None,
    squeezed: bool,
    validate_args: bool = True,
) -> CalibrationBins:
    """Run on ``(M, N, C)`` logits and ``(M, N)`` labels normalised by :func:`check_inputs`.

    Outside ``torch.compile`` the backend is chosen here (a forced one that cannot run raises before any work);
    inside, the op chooses at run time. With ``validate_args`` one host sync checks that no row was left out."""
    M, N, _ = logits.shape
    compiling = torch.compiler.is_compiling()
    name = (backend or "") if compiling else _dispatch.choose(OP, backend, logits=logits, n_bins=n_bins)
    ints, flts, sample_conf, sample_correct = torch.ops.vlmfast.calibration_bins(
        logits, labels, n_bins, return_samples, name)
    outs = _carve(ints, flts, M, n_bins)
    invalid = outs["nonfinite"]
    if validate_args and not compiling and bool(invalid.any()):
        raise_invalid(logits, labels, invalid, squeezed)
    # Fold slot n_bins (conf == 1.0 exactly) into the last bin; keep it apart as well (views of fresh buffers).
    counts = torch.stack((outs["bin_count"], outs["bin_correct"]))  # (2, M, n_bins + 1)
    folded = counts[..., :n_bins].clone()
    folded[..., -1] += counts[..., n_bins]
    conf = outs["bin_conf"][:, :n_bins].clone()
    conf[:, -1] += outs["bin_conf"][:, n_bins]
    return CalibrationBins(
        n_bins=n_bins,
        n_samples=N,
        bin_count=folded[0],
        bin_correct=folded[1],
        bin_conf_sum=conf,
        saturated_count=counts[0, :, n_bins],
        saturated_correct=counts[1, :, n_bins],
        nll_sum=outs["sums"][:, 0],
        brier_sum=outs["sums"][:, 1],
        confidence=sample_conf if return_samples else None,
        correct=sample_correct if return_samples else None,
        backend=name or "auto",
        n_invalid=invalid,
    )


def calibration_bins(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int = 15,
    *,
    return_samples: bool = False,
    backend: str | None = None,
    validate_args: bool = True,
) -> CalibrationBins:
    """Calibration sufficient statistics for ``(M, N, C)`` or ``(N, C)`` logits in one pass (see module docs).

    Args:
        logits: ``(M, N, C)`` or ``(N, C)``, float32/float16/bfloat16/float64, any strides, CPU or CUDA.
        labels: ``(N,)`` shared by all models, or ``(M, N)``; integer, values in ``[0, C)``.
        n_bins: number of equal-width confidence bins (>= 1).
        return_samples: also return per-sample ``confidence`` (float32) and ``correct`` (bool), ``(M, N)``.
        backend: force ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"`` (default: the first that can run;
            the environment variable ``VLMFAST_BACKEND`` does the same).
        validate_args: raise for NaN/inf logits and labels outside ``[0, C)`` (one host sync after the pass).
            ``False``: no sync; such rows are left out and counted in ``n_invalid`` (as inside ``torch.compile``).

    Returns:
        :class:`CalibrationBins`, always with a model dimension (M = 1 for 2-D logits).

    Raises:
        TypeError: non-float logits, non-integer labels, non-int n_bins.
        ValueError: shapes that do not match, empty input, labels out of range, NaN/inf logits (the message
            names the model, sample and class).
        vlmfast.BackendError: the forced backend cannot run these inputs (the message lists every backend).
    """
    logits, labels, n_bins, squeezed = check_inputs(logits, labels, n_bins)
    if not isinstance(return_samples, bool):
        raise TypeError(f"return_samples: expected a bool, got {type(return_samples).__name__}")
    return run_calibration_bins(logits, labels, n_bins, return_samples, backend, squeezed, bool(validate_args))
