"""vlmfast.audit: model audits beyond calibration.

=====================  ===================================================================================
``heatmaps``           batched explanation heatmaps: Chefer relevance (ViT, last / all blocks), Grad-CAM (ResNet)
=====================  ===================================================================================

Scores of the maps against object masks: :func:`vlmfast.metrics.rationality` (PT, IR, RMA).
"""

from vlmfast.audit.heatmaps import Heatmaps, default_blocks, heatmaps

__all__ = ["Heatmaps", "default_blocks", "heatmaps"]
