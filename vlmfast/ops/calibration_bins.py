"""The op ``calibration_bins``: calibration sufficient statistics for M models x N samples in one pass.

For logits ``(M, N, C)`` (or ``(N, C)``) and labels ``(N,)`` shared by all models (or ``(M, N)``), every backend
computes per row, with the softmax taken on the fly (online max; the ``(M, N, C)`` probabilities never exist):

* confidence ``conf = max_c p_c`` and prediction ``argmax_c x_c`` (ties go to the lowest class index, as
  ``torch.argmax``), correct = prediction == label;
* NLL ``logsumexp(x) - x_y`` and Brier ``sum_c p_c^2 - 2 p_y + 1``, in float32 (float64 for float64 logits);

and accumulates per model and confidence bin: the count, the sum of confidences and the number correct; per
model: the sums of NLL and Brier. Optionally it also returns the per-sample confidence and correctness
``(M, N)``, which equal-mass bins (ACE), per-batch ECE and PIECE need.

**Bins.** ``n_bins`` equal-width bins on [0, 1]: bin ``b`` holds ``b/n_bins <= conf < (b+1)/n_bins`` with exact
real-number edges (``floor(conf * n_bins)`` evaluated in float64), except the last, which is closed,
``[1 - 1/n_bins, 1]``: a confidence of exactly 1.0 (a saturated softmax) lands in the last bin. This equals
netcal and equals torchmetrics wherever torchmetrics is correct (torchmetrics puts conf == 1.0 in a hidden
extra bin). Such samples are also counted apart in ``saturated_count``/``saturated_correct`` so that the DAC/DOR
reference convention (which leaves them out of the bin means) can be reproduced.

Backends: ``triton`` (``kernels/calibration_bins.py``), ``cuda`` (``csrc/cuda/calibration_bins.cu``), ``cpp``
(``csrc/calibration_bins.cpp``), ``torch`` (:func:`calibration_bins_ref`, the oracle), chosen by
:mod:`vlmfast._dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view

OP = "calibration_bins"
MAX_BINS = 1 << 20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class CalibrationBins:
    """Sufficient statistics of one :func:`calibration_bins` call. Shapes: M models, ``n_bins`` bins.

    ``bin_*`` follow the standard convention (last bin closed, conf == 1.0 inside it). ``confidence`` and
    ``correct`` are ``(M, N)`` when requested with ``return_samples=True``, else None (float64 for float64 logits, else float32).
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

    @property
    def n_correct(self) -> torch.Tensor:
        return self.bin_correct.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Validation (shared with vlmfast.metrics)
# ----------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
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
    """Validate and normalise: returns ``(logits (M, N, C), labels (M, N) int32/int64, n_bins, squeezed)``.

    ``squeezed`` is True for 2-D input (results then drop the model dimension). Labels shared by all models come
    back as an expanded (stride-0) view, not a copy.
    """
    n_bins = check_n_bins(n_bins)
    logits = _as_tensor(logits, "logits")
    labels = _as_tensor(labels, "labels")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape (N, C) or (M, N, C), got {tuple(logits.shape)}")
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
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= C:
        bad = ((labels < 0) | (labels >= C)).nonzero()[0].tolist()
        where = f"sample {bad[1]}" if squeezed or labels.stride(0) == 0 else f"model {bad[0]}, sample {bad[1]}"
        raise ValueError(
            f"labels: expected values in [0, {C}) (C = {C} classes), got {int(labels[bad[0], bad[1]])} at {where}"
        )
    return logits, labels, n_bins, squeezed


def _raise_nonfinite(logits: torch.Tensor, nonfinite: torch.Tensor, squeezed: bool) -> None:
    bad_models = nonfinite.nonzero().flatten().tolist()
    m = bad_models[0]
    rows = (~torch.isfinite(logits[m])).nonzero()
    n, c = rows[0].tolist()
    value = float(logits[m, n, c])
    where = f"sample {n}, class {c}" if squeezed else f"model {m}, sample {n}, class {c}"
    total = int(nonfinite.sum())
    raise ValueError(
        f"logits: expected finite values, got {value} at {where} ({total} row(s) with NaN or inf"
        + ("" if squeezed else f" in model(s) {bad_models[:10]}{'...' if len(bad_models) > 10 else ''}")
        + ")"
    )


# ----------------------------------------------------------------------------------------------------------
# Torch reference (also the CPU/GPU fallback and the test oracle)
# ----------------------------------------------------------------------------------------------------------


def _row_stats_ref(x: torch.Tensor, y: torch.Tensor):
    """Per-row statistics for logits ``x (..., C)`` and labels ``y (...)``, computed in float32 (float64 stays)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(xf).all(dim=-1)
    xf = torch.where(finite.unsqueeze(-1), xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
    pred = xf.argmax(dim=-1)
    mx = xf.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    e = torch.exp(xf - mx.unsqueeze(-1))
    s = e.sum(dim=-1)
    s2 = (e * e).sum(dim=-1)
    xy = xf.gather(-1, y.unsqueeze(-1).long()).squeeze(-1)
    conf = 1.0 / s
    nll = mx + torch.log(s) - xy
    brier = s2 / (s * s) - 2.0 * torch.exp(xy - mx) / s + 1.0
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
            conf, pred, nll, brier, finite = _row_stats_ref(x, y)
            correct = pred == y
            m_idx = torch.full((n1 - n0,), m, dtype=torch.long, device=logits.device)
            _accumulate(conf, correct, nll, brier, finite, m_idx, n_bins, outs)
            if outs.get("sample_conf") is not None:
                outs["sample_conf"][m, n0:n1] = conf.to(outs["sample_conf"].dtype)
                outs["sample_correct"][m, n0:n1] = correct & finite


def calibration_bins_ref(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, return_samples: bool = False
) -> CalibrationBins:
    """Torch reference of :func:`calibration_bins` (same inputs and result); the oracle of the tests."""
    return calibration_bins(logits, labels, n_bins, return_samples=return_samples, backend="torch")


# ----------------------------------------------------------------------------------------------------------
# Backend entries. All share one contract: zero-initialised output buffers, accumulated into.
# ----------------------------------------------------------------------------------------------------------


def _check_torch(**inputs) -> list[str]:
    return []


def _check_cpp(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    reasons = []
    if logits.device.type != "cpu":
        reasons.append(f"needs CPU tensors, got {logits.device}")
    if logits.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {logits.dtype} unsupported")
    return reasons


def _check_cuda(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    reasons = []
    if logits.device.type != "cuda":
        reasons.append(f"needs CUDA tensors, got {logits.device}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {logits.dtype} unsupported (float32, float16, bfloat16)")
    if n_bins > 4096:
        reasons.append(f"n_bins = {n_bins} > 4096 (bins live in shared memory)")
    return reasons


def _check_triton(logits: torch.Tensor, n_bins: int, **_) -> list[str]:
    reasons = []
    if logits.device.type == "cpu":
        if not _dispatch.triton_interpreting():
            reasons.append("needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    elif logits.device.type != "cuda":
        reasons.append(f"needs CUDA tensors, got {logits.device}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {logits.dtype} unsupported (float32, float16, bfloat16)")
    if n_bins > 1024:
        reasons.append(f"n_bins = {n_bins} > 1024 (bins are kept in registers)")
    return reasons


@_dispatch.register(OP, "torch", _check_torch)
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
# Equal-mass bins (ACE) over the per-sample confidences: a follow-up on (M, N) values, not on the logits
# ----------------------------------------------------------------------------------------------------------


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


def equal_mass_sums_ref(conf: torch.Tensor, correct: torch.Tensor, n_bins: int):
    """Equal-mass bins: each model's confidences sorted (stable: ties keep sample order) and cut into ``n_bins``
    groups by :func:`equal_mass_ids`. Returns ``(count, n_correct, conf_sum)``, each ``(M, n_bins)``."""
    M, N = conf.shape
    sorted_conf, order = torch.sort(conf, dim=1, stable=True)
    bid = equal_mass_ids(N, n_bins, conf.device).unsqueeze(0).expand(M, N)
    return group_sums(bid, correct.gather(1, order), sorted_conf, n_bins)


def equal_mass_sums(conf: torch.Tensor, correct: torch.Tensor, n_bins: int, *, backend: str | None = None):
    """:func:`equal_mass_sums_ref` with a stable radix sort in the extension for CPU tensors (the sort dominates
    ACE; a few times faster than ``torch.sort``). CUDA tensors use ``torch.sort`` (a device segmented sort).
    ``backend="torch"`` keeps the reference path; any other value (the backend forced for the logits pass)
    does not apply to this step."""
    C = get_C()
    if backend == "torch" or conf.device.type != "cpu" or C is None:
        return equal_mass_sums_ref(conf, correct, n_bins)
    M, _ = conf.shape
    conf = conf.contiguous()
    correct = correct.contiguous()
    count = torch.zeros(M, n_bins, dtype=torch.int64)
    n_correct = torch.zeros(M, n_bins, dtype=torch.int64)
    conf_sum = torch.zeros(M, n_bins, dtype=torch.float64)
    C.equal_mass_bins_cpu(tensor_view(conf), tensor_view(correct), n_bins, tensor_view(count), tensor_view(n_correct),
                          tensor_view(conf_sum), torch.get_num_threads())
    return count, n_correct, conf_sum


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def _empty_outputs(
    M: int, N: int, n_bins: int, device: torch.device, return_samples: bool, conf_dtype: torch.dtype = torch.float32
) -> dict:
    # Two allocations (integers, floats) carved into the contiguous views the backends accumulate into.
    nb1 = n_bins + 1
    ints = torch.zeros(2 * M * nb1 + M, dtype=torch.int64, device=device)
    flts = torch.zeros(M * nb1 + 2 * M, dtype=torch.float64, device=device)
    outs = {
        "bin_count": ints[: M * nb1].view(M, nb1),
        "bin_correct": ints[M * nb1 : 2 * M * nb1].view(M, nb1),
        "nonfinite": ints[2 * M * nb1 :],
        "bin_conf": flts[: M * nb1].view(M, nb1),
        "sums": flts[M * nb1 :].view(M, 2),
        "sample_conf": None,
        "sample_correct": None,
    }
    if return_samples:
        outs["sample_conf"] = torch.zeros(M, N, dtype=conf_dtype, device=device)
        outs["sample_correct"] = torch.zeros(M, N, dtype=torch.bool, device=device)
    return outs


def run_calibration_bins(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int, return_samples: bool, backend: str | None, squeezed: bool
) -> CalibrationBins:
    """Run on already validated ``(M, N, C)`` logits and ``(M, N)`` labels (see :func:`check_inputs`)."""
    M, N, _ = logits.shape
    impl = _dispatch.select(OP, backend, logits=logits, n_bins=n_bins)
    conf_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    outs = _empty_outputs(M, N, n_bins, logits.device, return_samples, conf_dtype)
    impl.fn(logits, labels, n_bins, outs)
    nonfinite = outs["nonfinite"]
    if bool((nonfinite > 0).any()):
        _raise_nonfinite(logits, nonfinite, squeezed)
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
        confidence=outs["sample_conf"],
        correct=outs["sample_correct"],
        backend=impl.backend,
    )


def calibration_bins(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_bins: int = 15,
    *,
    return_samples: bool = False,
    backend: str | None = None,
) -> CalibrationBins:
    """Calibration sufficient statistics for ``(M, N, C)`` or ``(N, C)`` logits in one pass (see module docs).

    Args:
        logits: ``(M, N, C)`` or ``(N, C)``, float32/float16/bfloat16/float64, any strides, CPU or CUDA.
        labels: ``(N,)`` shared by all models, or ``(M, N)``; integer, values in ``[0, C)``.
        n_bins: number of equal-width confidence bins (>= 1).
        return_samples: also return per-sample ``confidence`` (float32) and ``correct`` (bool), ``(M, N)``.
        backend: force ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"`` (default: the first that can run;
            the environment variable ``VLMFAST_BACKEND`` does the same).

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
    return run_calibration_bins(logits, labels, n_bins, return_samples, backend, squeezed)

