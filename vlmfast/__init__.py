"""vlmfast: fast fine-tuning and auditing of CLIP-style vision-language models.

Public surface (stable): ``vlmfast.metrics`` (calibration, CalibrationError, piece), ``vlmfast.functional`` (the
ops, also ``torch.ops.vlmfast.<op>``), ``vlmfast.plot`` (reliability_diagram), ``vlmfast.data`` (datasets with
ground truth, streaming folders), ``vlmfast.models`` (open_clip models, text path, pretrained base),
``vlmfast.losses`` (ClipLoss), ``vlmfast.train`` (the training engine), ``vlmfast.ops`` (the ops with their torch
references), ``vlmfast.backends()``, and ``BackendError``. Heavy modules (plot, data, models, losses, train) load on
first use. The command line (``vlmfast.cli``) is an app on top; the library never imports it.
"""

from __future__ import annotations

import importlib

from vlmfast import functional, metrics, ops
from vlmfast._dispatch import BACKENDS, BackendError
from vlmfast._version import __version__
from vlmfast.metrics import CalibrationError, CalibrationResult, calibration, piece

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendError",
    "CalibrationError",
    "CalibrationResult",
    "backends",
    "calibration",
    "functional",
    "metrics",
    "data",
    "losses",
    "models",
    "ops",
    "piece",
    "plot",
    "train",
]


_LAZY = ("plot", "data", "models", "losses", "train")


def backends() -> dict[str, list[str]]:
    """Every backend with the reasons it is unavailable in this process (empty list: available)."""
    from vlmfast._dispatch import backend_reasons, list_backends

    return {name: backend_reasons(name) for name in list_backends()}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"vlmfast.{name}")
    raise AttributeError(f"module 'vlmfast' has no attribute {name!r}")
