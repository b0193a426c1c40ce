"""Training losses with open_clip's signatures, on the fused op ``contrastive_loss`` (float64: the materialised formula).

:class:`ClipLoss` / :func:`clip_loss`: the symmetric contrastive (InfoNCE) loss of CLIP, called like
``open_clip.loss.ClipLoss`` — ``loss(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)`` — on a single process (no feature gathering):

* ``logits_per_image = logit_scale * image_features @ text_features.T`` (+ ``logit_bias``),
  ``logits_per_text = logit_scale * text_features @ image_features.T`` (+ ``logit_bias``); ``logit_scale`` is the
  multiplier itself (``model.logit_scale.exp()``), as open_clip passes it; features are used as given (normalise
  them first, as open_clip's models do);
* loss = ½ [CE(logits_per_image, targets) + CE(logits_per_text, targetsᵀ)];
* targets: one-hot on the diagonal (image i ↔ caption i) by default; with ``labels`` (``(N,)`` class ids) they are
  **class-aware** — row i is uniform over the captions j with ``labels[j] == labels[i]`` (itself included), so
  same-class captions are positives of each other instead of negatives. With all labels distinct this is exactly
  the one-hot loss.

``logit_bias`` is added to every logit as open_clip's ``ClipLoss`` does (a constant shift, so it does not change
this loss; SigLIP's sigmoid loss, where it matters, is a different loss). ``output_dict=True`` returns
``{"contrastive_loss": loss}`` (open_clip's key), for training loops that sum a dict of named losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ClipLoss", "DistillClipLoss", "RegionLoss", "clip_loss", "clip_logits", "clip_targets"]


def _check_features(image_features: Any, text_features: Any) -> None:
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected shape (N, D), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features/text_features: expected the same shape (N, D) (pair i is image i with caption i), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] < 1:
        raise ValueError("image_features: expected at least one pair, got N = 0")


def _check_scalar(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a float or a scalar tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{name}: expected a scalar (one element), got shape {tuple(value.shape)}")


def clip_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_per_image, logits_per_text)``, each ``(N, N)``, as open_clip's ``ClipLoss.get_logits``."""
    _check_features(image_features, text_features)
    _check_scalar(logit_scale, "logit_scale")
    per_image = logit_scale * image_features @ text_features.T
    per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        _check_scalar(logit_bias, "logit_bias")
        per_image = per_image + logit_bias
        per_text = per_text + logit_bias
    return per_image, per_text


def clip_targets(
    n: int, labels: torch.Tensor | None = None, *, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Targets for :func:`clip_loss`: ``(n,)`` int64 ``arange`` without labels; with ``labels`` an ``(n, n)`` float
    matrix of ``dtype`` whose row i is uniform over the j with ``labels[j] == labels[i]``."""
    if labels is None:
        return torch.arange(n, device=device)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected an integer torch.Tensor of shape ({n},) or None, got "
                        f"{type(labels).__name__}")
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) (one class id per pair), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    labels = labels.to(device) if device is not None else labels
    same = (labels[:, None] == labels[None, :]).to(dtype)
    return same / same.sum(1, keepdim=True)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    output_dict: bool = False,
    *,
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Symmetric CLIP contrastive loss (module docstring); a scalar, or ``{"contrastive_loss": scalar}``.

    ``image_features``, ``text_features``: ``(N, D)`` floating, pair i = (image i, caption i). ``logit_scale``: the
    multiplier (``exp`` of the model's parameter). ``labels``: optional ``(N,)`` class ids for class-aware targets.
    Gradients flow to the features, ``logit_scale`` and ``logit_bias``. float32 / float16 / bfloat16 features run
    the fused op ``contrastive_loss`` (:func:`vlmfast.functional.clip_loss` with ``normalize=False``: the B x B
    logits are never materialised on the Triton path); float64 features run the materialised formula in float64.
    """
    _check_features(image_features, text_features)
    _check_scalar(logit_scale, "logit_scale")
    if logit_bias is not None:
        _check_scalar(logit_bias, "logit_bias")
    if image_features.dtype != torch.float64 and text_features.dtype != torch.float64:
        from vlmfast.ops.contrastive_loss import clip_loss as fused

        return fused(image_features, text_features, logit_scale, logit_bias=logit_bias, labels=labels,
                     label_smoothing=label_smoothing, normalize=False, output_dict=output_dict)
    per_image, per_text = clip_logits(image_features, text_features, logit_scale, logit_bias)
    targets = clip_targets(per_image.shape[0], labels, device=per_image.device, dtype=per_image.dtype)
    # one matrix serves both directions: caption i's positives are the images of its class, the same set and the
    # same count as image i's positives among the captions
    loss = 0.5 * (F.cross_entropy(per_image, targets, label_smoothing=label_smoothing)
                  + F.cross_entropy(per_text, targets, label_smoothing=label_smoothing))
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(torch.nn.Module):
    """Module form of :func:`clip_loss`, a drop-in for single-process ``open_clip.loss.ClipLoss``:
    ``ClipLoss()(image_features, text_features, logit_scale, logit_bias=None, output_dict=False, labels=None)``.

    ``world_size`` other than 1 (feature gathering across processes) is not supported yet and raises.
    """

    def __init__(self, *, world_size: int = 1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size != 1:
            raise ValueError(f"world_size: only single-process training (1) is supported, got {world_size!r}")
        _check_smoothing(label_smoothing)
        self.world_size = world_size
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return clip_loss(image_features, text_features, logit_scale, logit_bias, output_dict, labels=labels,
                         label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, label_smoothing={self.label_smoothing}"


def _check_smoothing(label_smoothing: Any) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")


class DistillClipLoss(ClipLoss):
    """CLIP loss plus self-distillation from a teacher, called like ``open_clip.loss.DistillClipLoss``:
    ``(contrastive, distill) = loss(image_features, text_features, logit_scale, dist_image_features,
    dist_text_features, dist_logit_scale, output_dict=False)`` on the fused op (one call: the teacher's row and
    column softmax are soft targets of the student's, tile by tile).

    ``directions="sum"`` (default) sums the soft-target CE of the two directions, as CaRot's L_SD;
    ``"mean"`` averages them, as open_clip's ``DistillClipLoss``. Features are used as given (normalise first).
    """

    def __init__(self, *, world_size: int = 1, label_smoothing: float = 0.0, directions: str = "sum") -> None:
        super().__init__(world_size=world_size, label_smoothing=label_smoothing)
        if directions not in ("sum", "mean"):
            raise ValueError(f"directions: expected 'sum' (CaRot) or 'mean' (open_clip), got {directions!r}")
        self.directions = directions

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        dist_image_features: torch.Tensor,
        dist_text_features: torch.Tensor,
        dist_logit_scale: torch.Tensor | float,
        output_dict: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        from vlmfast.ops.contrastive_loss import clip_loss as fused

        _check_features(image_features, text_features)
        contrastive, distill = fused(image_features, text_features, logit_scale,
                                     label_smoothing=self.label_smoothing, normalize=False,
                                     teacher=(dist_image_features, dist_text_features, dist_logit_scale))
        if self.directions == "mean":
            distill = distill / 2
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def extra_repr(self) -> str:
        return super().extra_repr() + f", directions={self.directions!r}"


class RegionLoss(torch.nn.Module):
    """RaVL's region-aware loss ``L_R + L_A`` (the fused op :func:`vlmfast.functional.region_loss`) as a module:
    ``RegionLoss(temperature=0.07)(regions (B, R, D), text (C, D), labels (B,), relevant (B, R), spurious (B, R))``
    returns the mean over the images with a relevant region (``reduction``: ``"mean"``, ``"sum"``, ``"none"``).
    ``text`` is usually the frozen class embeddings of the Stage-1 model (:mod:`vlmfast.tuning.region`)."""

    def __init__(self, temperature: float = 0.07, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.temperature, self.normalize, self.reduction = float(temperature), bool(normalize), reduction

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"

    def forward(self, regions: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, relevant: torch.Tensor,
                spurious: torch.Tensor) -> torch.Tensor:
        from vlmfast.ops.region_loss import region_loss

        return region_loss(regions, text, labels, relevant, spurious, temperature=self.temperature,
                           normalize=self.normalize, reduction=self.reduction).loss
