"""``nn.Module`` forms of the fused ops (each a thin wrapper over its functional in :mod:`vlmfast.functional`).

* :class:`ClipLoss` — symmetric CLIP contrastive loss on the fused op ``contrastive_loss``, called like
  ``open_clip.loss.ClipLoss`` (``logit_scale``, ``logit_bias``, ``output_dict``; features used as given);
* :class:`DistillClipLoss` — the same plus self-distillation from a teacher (``open_clip.loss.DistillClipLoss``'s
  call; CaRot's summed directions by default);
* :class:`PromptLogitsLoss` — the fused prompt-logit cross-entropy head;
* :class:`RegionLoss` — RaVL's region-aware loss on the fused op ``region_loss``.
"""

from vlmfast.losses import ClipLoss, DistillClipLoss, RegionLoss
from vlmfast.ops.prompt_logits import PromptLogitsLoss

__all__ = ["ClipLoss", "DistillClipLoss", "PromptLogitsLoss", "RegionLoss"]
