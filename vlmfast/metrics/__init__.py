"""Metrics. Each is a functional (one call) plus, where streaming makes sense, a stateful class with
``update``/``compute``/``reset`` (the torchmetrics pattern)."""

from vlmfast.metrics.calibration_error import (
    CalibrationError,
    CalibrationResult,
    calibration,
    calibration_from_features,
)
from vlmfast.metrics.proximity import piece, proximity

__all__ = ["CalibrationError", "CalibrationResult", "calibration", "calibration_from_features", "piece", "proximity"]
