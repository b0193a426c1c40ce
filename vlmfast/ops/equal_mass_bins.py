"""The op ``equal_mass_bins``: equal-mass (ACE) bins of per-sample confidences, for M models at once.

Input: the ``(M, N)`` confidences and correctness that :func:`vlmfast.ops.calibration_bins.calibration_bins`
returns with ``return_samples=True``. Per model the confidences are sorted ascending, **stably** (ties keep sample
order), and cut into ``n_bins`` contiguous groups whose sizes differ by at most one, the first ``N mod n_bins``
larger (:func:`vlmfast.metrics.binning.equal_mass_ids`, the ``torch.tensor_split`` rule). Output per group: the
count, the number correct and the sum of confidences, each ``(M, n_bins)`` (int64, int64, float64).

The sort dominates ACE. Backends: ``cpp`` (``csrc/equal_mass_bins.cpp``: LSD radix sort of the float bits, OpenMP
over models, a few times faster than ``torch.sort``) and ``torch`` (:func:`equal_mass_bins_ref`: ``torch.sort``,
a segmented device sort on CUDA; the oracle). Registered as ``torch.ops.vlmfast.equal_mass_bins``; not
differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view

OP = "equal_mass_bins"
CONF_DTYPES = (torch.float32, torch.float64)


def _probe(device: str) -> dict[str, Any]:
    return {"confidence": torch.empty(1, 2, device=device), "n_bins": 15}


_dispatch.define_op(OP, device_arg="confidence", probe=_probe, module=__name__)


def _check_inputs(confidence: Any, correct: Any, n_bins: Any) -> tuple[Tensor, Tensor, int]:
    from vlmfast.ops.calibration_bins import check_n_bins

    n_bins = check_n_bins(n_bins)
    if not isinstance(confidence, Tensor) or not isinstance(correct, Tensor):
        raise TypeError(f"confidence/correct: expected tensors, got {type(confidence).__name__} and "
                        f"{type(correct).__name__}")
    if confidence.dim() != 2 or confidence.shape[1] == 0:
        raise ValueError(f"confidence: expected shape (M, N) with N >= 1, got {tuple(confidence.shape)}")
    if confidence.dtype not in CONF_DTYPES:
        raise TypeError(f"confidence: expected float32 or float64, got {confidence.dtype}")
    if correct.shape != confidence.shape:
        raise ValueError(f"correct: expected shape {tuple(confidence.shape)} like confidence, got {tuple(correct.shape)}")
    if correct.device != confidence.device:
        raise ValueError(f"correct: expected on confidence's device {confidence.device}, got {correct.device}")
    if correct.dtype != torch.bool:
        correct = correct != 0
    return confidence, correct, n_bins


# ----------------------------------------------------------------------------------------------------------
# Backend forwards: (confidence (M, N), correct (M, N) bool, n_bins) -> (count, n_correct, conf_sum)
# ----------------------------------------------------------------------------------------------------------


@_dispatch.register(OP, "torch")
def _equal_mass_bins_torch(confidence: Tensor, correct: Tensor, n_bins: int):
    # imported here: vlmfast.metrics imports this module, so a top-level import would be circular
    from vlmfast.metrics.binning import equal_mass_ids, group_sums

    M, N = confidence.shape
    sorted_conf, order = torch.sort(confidence, dim=1, stable=True)
    bid = equal_mass_ids(N, n_bins, confidence.device).unsqueeze(0).expand(M, N)
    return group_sums(bid, correct.gather(1, order), sorted_conf, n_bins)


def _check_cpp(confidence: Tensor, **_) -> list[str]:
    return [] if confidence.shape[1] < 2**31 else [f"N = {confidence.shape[1]} >= 2**31 samples"]


@_dispatch.register(OP, "cpp", _check_cpp)
def _equal_mass_bins_cpp(confidence: Tensor, correct: Tensor, n_bins: int):
    M, _ = confidence.shape
    confidence = confidence.contiguous()
    correct = correct.contiguous()
    count = torch.zeros(M, n_bins, dtype=torch.int64)
    n_correct = torch.zeros(M, n_bins, dtype=torch.int64)
    conf_sum = torch.zeros(M, n_bins, dtype=torch.float64)
    get_C().equal_mass_bins_cpu(tensor_view(confidence), tensor_view(correct), n_bins, tensor_view(count),
                                tensor_view(n_correct), tensor_view(conf_sum), torch.get_num_threads())
    return count, n_correct, conf_sum


# ----------------------------------------------------------------------------------------------------------
# torch.library op and public entry
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmfast::equal_mass_bins", mutates_args=())
def _equal_mass_bins_op(confidence: Tensor, correct: Tensor, n_bins: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.select(OP, backend or None, confidence=confidence, n_bins=n_bins)
    return impl.forward(confidence, correct, n_bins)


@_equal_mass_bins_op.register_fake
def _equal_mass_bins_fake(confidence, correct, n_bins, backend):
    M = confidence.shape[0]
    return (confidence.new_empty(M, n_bins, dtype=torch.int64), confidence.new_empty(M, n_bins, dtype=torch.int64),
            confidence.new_empty(M, n_bins, dtype=torch.float64))


def equal_mass_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = 15, *, backend: str | None = None, strict: bool = True
) -> tuple[tuple[Tensor, Tensor, Tensor], str, str | None]:
    """Equal-mass bins of ``(M, N)`` confidences (see module docs).

    Returns ``((count, n_correct, conf_sum), backend_run, note)``. ``backend`` forces a backend. With
    ``strict=True`` a forced backend that cannot run raises :class:`vlmfast.BackendError`; with ``strict=False``
    (a follow-up step of a computation whose main op was forced) the default choice runs instead and ``note`` says
    why, for the caller's result.
    """
    confidence, correct, n_bins = _check_inputs(confidence, correct, n_bins)
    note = None
    if torch.compiler.is_compiling():
        name = backend or ""
    elif strict:
        name = _dispatch.choose(OP, backend, confidence=confidence, n_bins=n_bins)
    else:
        impl, note = _dispatch.select_step(OP, backend, confidence=confidence, n_bins=n_bins)
        name = impl.backend
    sums = torch.ops.vlmfast.equal_mass_bins(confidence, correct, n_bins, name)
    return tuple(sums), name or "auto", note


def equal_mass_bins_ref(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Torch reference of :func:`equal_mass_bins`: ``(count, n_correct, conf_sum)``, each ``(M, n_bins)``."""
    return equal_mass_bins(confidence, correct, n_bins, backend="torch")[0]
