"""Ops: each module holds the torch reference (``<op>_ref``), the backend entries registered with the dispatcher,
and the public entry. One stem per op across kernels/, csrc/, vlmfast/ops/, tests/ and benchmarks/."""

from vlmfast.ops.calibration_bins import CalibrationBins, calibration_bins, calibration_bins_ref

__all__ = ["CalibrationBins", "calibration_bins", "calibration_bins_ref"]
