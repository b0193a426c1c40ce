"""Metrics. Each is a functional (one call) plus, where streaming makes sense, a stateful class with
``update``/``compute``/``reset`` (the torchmetrics pattern)."""

from vlmfast.metrics.calibration_error import (
    CalibrationError,
    CalibrationResult,
    calibration,
    calibration_from_features,
)
from vlmfast.metrics.proximity import piece, proximity
from vlmfast.metrics.rationality import (RationalityResult, masks_from_boxes, masks_from_polygons, rationality,
                                         resize_masks)

__all__ = ["CalibrationError", "CalibrationResult", "RationalityResult", "calibration", "calibration_from_features",
           "masks_from_boxes", "masks_from_polygons", "piece", "proximity", "rationality", "resize_masks"]
