"""Stable functional entry points of the ops (each dispatches to the fastest backend that can run its inputs)."""

from vlmfast.ops.calibration_bins import CalibrationBins, calibration_bins, calibration_bins_ref

__all__ = ["CalibrationBins", "calibration_bins", "calibration_bins_ref"]
