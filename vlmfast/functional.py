"""Stable functional entry points of the ops (each dispatches to the fastest backend that can run its inputs;
``backend=`` forces one). Each is also a ``torch.library`` op, ``torch.ops.vlmfast.<op>``."""

from vlmfast.ops.calibration_bins import CalibrationBins, calibration_bins, calibration_bins_ref
from vlmfast.ops.contrastive_loss import Teacher, clip_loss, clip_loss_ref
from vlmfast.ops.equal_mass_bins import equal_mass_bins, equal_mass_bins_ref
from vlmfast.ops.kmeans_assign import KMeansAssignment, kmeans_assign, kmeans_assign_ref
from vlmfast.ops.prompt_logits import (
    PromptLogitsLoss,
    PromptLogitsOutput,
    prompt_logits,
    prompt_logits_loss,
    prompt_logits_ref,
)
from vlmfast.ops.region_loss import RegionLossOutput, region_loss, region_loss_ref

__all__ = ["CalibrationBins", "calibration_bins", "calibration_bins_ref", "Teacher", "clip_loss", "clip_loss_ref", "equal_mass_bins", "equal_mass_bins_ref",
           "PromptLogitsLoss", "PromptLogitsOutput", "prompt_logits", "prompt_logits_loss", "prompt_logits_ref",
           "KMeansAssignment", "kmeans_assign", "kmeans_assign_ref", "RegionLossOutput", "region_loss", "region_loss_ref"]
