"""Batched explanation heatmaps of CLIP-style image towers, on the device (spec:
``shared/specs/methods_rationality.md`` §2, §8).

* **ViT** (open_clip ``VisionTransformer``): gradient-weighted attention relevance (Chefer et al. 2021). For block
  b, ``A_b`` = attention probabilities (B, heads, N, N) and ``G_b = ds/dA_b``; ``Abar_b = mean_h relu(G_b * A_b)``;
  ``R = I``, ``R <- R + Abar_b R`` over the blocks; the map is ``R[0, 1:]`` on the patch grid.
  ``blocks="last"``: only the last block (the map is ``Abar_L[0, 1:]``); every earlier block runs as usual
  (fused attention, no graph) and only the last one with explicit attention. ``blocks="all"``: every block with
  explicit attention, ONE ``autograd.grad`` call for all the attention maps, then row 0 of the product is
  propagated with vector-matrix products (``r <- r + r Abar_b`` for b = L..1) instead of N x N matrix products.
* **ResNet** (open_clip ``ModifiedResNet``): Grad-CAM on the last convolutional stage (``layer4``, before the
  attention pool): ``relu(sum_c mean_hw(ds/dA_c) A_c)``.

Samples never interact (LayerNorm per token; batch norm in eval mode), so one backward of ``sum_i s_i`` gives every
sample's exact gradient: the batch is as exact as one image at a time (a test compares with a literal per-image
implementation). The **target** ``s_i`` explains the ground-truth class ``y_i`` even when the prediction is wrong:
for a CLIP model ``logit_scale * cos(image_i, text(template(y_i)))`` (the single template ``"a photo of a {}"`` by
default, as the paper); for an :class:`vlmfast.tuning.robust.ImageClassifier` (LP / FT) the head's ground-truth
logit. The same forward gives the predictions (argmax over all classes).

Post-processing (batched, on the device): bilinear upsampling to ``size`` (default: the input images' own size, so
masks in the images' geometry align; the preprocessing resizes whole images, no crop), then per-image min-max to
[0, 1]; a map with no contrast becomes all zeros (counted invalid by :func:`vlmfast.metrics.rationality`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Heatmaps", "default_blocks", "heatmaps"]

BLOCKS = ("last", "all")
DEFAULT_TEMPLATE = "a photo of a {}"


class Heatmaps(NamedTuple):
    """``maps (N, H, W)`` float32 in [0, 1]; ``predictions (N,)`` int64; ``correct (N,)`` bool; ``targets (N,)``
    the explained scalar per sample; ``method``: ``"chefer-last"``, ``"chefer-all"`` or ``"gradcam"``."""

    maps: torch.Tensor
    predictions: torch.Tensor
    correct: torch.Tensor
    targets: torch.Tensor
    method: str


def default_blocks(model_or_classifier: nn.Module) -> str:
    """The paper's choice: ``"all"`` for a linear-probe / fine-tuned classifier head, ``"last"`` for zero-shot and
    contrastively tuned CLIP models."""
    return "all" if _is_classifier(model_or_classifier) else "last"


def _is_classifier(m: nn.Module) -> bool:
    return hasattr(m, "head") and isinstance(getattr(m, "head"), nn.Linear) and hasattr(m, "features")


def _family(visual: nn.Module) -> str:
    from vlmfast.models.factory import model_family

    return model_family(visual)


class _ExplicitAttention:
    """Replaces ``block.attention`` (open_clip ``ResidualAttentionBlock``) by the same multi-head attention with the
    probabilities materialised and recorded; ``leaf=True`` detaches them into a leaf that requires grad."""

    def __init__(self, block: nn.Module, record: list, leaf: bool) -> None:
        mha = block.attn
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or not mha.batch_first:
            raise ValueError(f"model: heatmaps need open_clip blocks with batch-first nn.MultiheadAttention, got "
                             f"{type(mha).__name__}")
        if hasattr(block, "ln_1_kv"):
            raise ValueError("model: cross-attention blocks are not supported by the relevance rule")
        self.block, self.mha, self.record, self.leaf = block, mha, record, leaf

    def __call__(self, q_x, k_x=None, v_x=None, attn_mask=None):
        mha = self.mha
        b, n, e = q_x.shape
        h = mha.num_heads
        d = e // h
        qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in qkv.split(e, dim=-1))
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)
        a = scores.softmax(dim=-1)
        if self.leaf:
            a = a.detach().requires_grad_(True)
        self.record.append(a)
        out = (a @ v).transpose(1, 2).reshape(b, n, e)
        return mha.out_proj(out)


def _vit_maps(visual: nn.Module, x: torch.Tensor, target_fn, blocks: str) -> tuple[torch.Tensor, Any]:
    resblocks = list(visual.transformer.resblocks)
    start = len(resblocks) - 1 if blocks == "last" else 0
    record: list[torch.Tensor] = []
    for i, blk in enumerate(resblocks):
        if i >= start:
            blk.attention = _ExplicitAttention(blk, record, leaf=i == start)
    try:
        with torch.enable_grad():
            feats = visual(x)
            s, extra = target_fn(feats)
            grads = torch.autograd.grad(s.sum(), record)
    finally:
        for blk in resblocks:
            blk.__dict__.pop("attention", None)
    n_tok = record[0].shape[-1]
    r = torch.zeros(x.shape[0], n_tok, device=x.device, dtype=torch.float32)
    r[:, 0] = 1.0
    for a, g in zip(reversed(record), reversed(grads)):
        abar = (g.float() * a.detach().float()).clamp_min(0).mean(dim=1)  # (B, N, N)
        r = r + torch.bmm(r.unsqueeze(1), abar).squeeze(1)
    grid = visual.grid_size if hasattr(visual, "grid_size") else None
    n_patch = n_tok - 1
    if grid is None or grid[0] * grid[1] != n_patch:
        side = int(round(n_patch ** 0.5))
        grid = (side, n_patch // side)
    return r[:, 1:].reshape(-1, grid[0], grid[1]), (s.detach(), extra)


def _gradcam_maps(visual: nn.Module, x: torch.Tensor, target_fn) -> tuple[torch.Tensor, Any]:
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf

    handle = visual.layer4.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            feats = visual(x)
            s, extra = target_fn(feats)
            (grad,) = torch.autograd.grad(s.sum(), [store["act"]])
    finally:
        handle.remove()
    act = store["act"].detach().float()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    return (weights * act).sum(dim=1).clamp_min(0), (s.detach(), extra)


def _postprocess(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = F.interpolate(cams[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.reshape(up.shape[0], -1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-30), torch.zeros_like(flat))
    return out.reshape(up.shape)


def heatmaps(
    model: nn.Module,
    images: Any,
    labels: Any,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    text_features: torch.Tensor | None = None,
    blocks: str | None = None,
    size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "heatmaps",
) -> Heatmaps:
    """Heatmaps explaining the ground-truth class of every image (module docs), batched on the model's device.

    ``model``: an open_clip CLIP model (target: ``logit_scale * cos`` with the class prompts) or an
    :class:`vlmfast.tuning.robust.ImageClassifier` (target: the head's ground-truth logit). ``images``: ``(N, 3,
    H, W)`` uint8 (or a dataset with ``.images``); ``labels``: ``(N,)`` class ids (or ``.labels`` of the dataset).
    ``classnames`` / ``templates`` build the text features of a CLIP model (``zero_shot_head``; default template
    ``"a photo of a {}"``), or pass ``text_features (C, D)``. ``blocks``: ``"last"`` | ``"all"`` (ViT only; default
    :func:`default_blocks`). ``size``: output size (default the images' ``(H, W)``). ``progress``: a bar over
    the batches (stderr), labelled ``desc``.
    """
    from vlmfast.models.factory import preprocess_for
    from vlmfast.models.text import zero_shot_head

    if hasattr(images, "images") and labels is None:
        labels = images.labels
    data_images = images.images if hasattr(images, "images") else images
    imgs = torch.as_tensor(data_images)
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W), got {tuple(imgs.shape)}")
    y = torch.as_tensor(labels).long()
    if tuple(y.shape) != (imgs.shape[0],):
        raise ValueError(f"labels: expected shape ({imgs.shape[0]},), got {tuple(y.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    classifier = _is_classifier(model)
    visual = model.visual
    family = _family(visual)
    if family not in ("vit", "resnet"):
        raise ValueError(f"model: heatmaps support open_clip VisionTransformer and ModifiedResNet towers, got "
                         f"{type(visual).__name__}")
    if blocks is None:
        blocks = default_blocks(model)
    if blocks not in BLOCKS:
        raise ValueError(f"blocks: expected one of {BLOCKS}, got {blocks!r}")
    dev = next(model.parameters()).device
    if classifier:
        n_cls = model.head.out_features
    else:
        if text_features is None:
            if classnames is None:
                raise ValueError("classnames: a CLIP model needs classnames (or text_features) for its targets")
            text_features = zero_shot_head(model, list(classnames), list(templates))
        text_features = F.normalize(text_features.to(dev).float(), dim=-1)
        n_cls = text_features.shape[0]
        scale = model.logit_scale.detach().exp().float() if getattr(model, "logit_scale", None) is not None \
            else torch.tensor(100.0, device=dev)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_cls):
        raise ValueError(f"labels: expected class ids in [0, {n_cls}), got [{int(y.min())}, {int(y.max())}]")
    out_size = (imgs.shape[-2], imgs.shape[-1]) if size is None else (
        (size, size) if isinstance(size, int) else (int(size[0]), int(size[1])))

    def target_fn_for(yb):
        def target_fn(feats):
            if classifier:
                f = F.normalize(feats.float(), dim=-1) if model.normalize else feats.float()
                logits = model.head(f)
            else:
                logits = scale * F.normalize(feats.float(), dim=-1) @ text_features.t()
            return logits.gather(1, yb[:, None])[:, 0], logits.detach().argmax(dim=1)
        return target_fn

    was = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    maps, preds, targets = [], [], []
    starts = range(0, imgs.shape[0], batch_size)
    bar = None
    if progress:
        from vlmfast._progress import bar as _bar

        bar = _bar(len(starts), desc, "batch")
    try:
        for s0 in starts:
            x = preprocess_for(model, imgs[s0:s0 + batch_size])
            yb = y[s0:s0 + batch_size].to(dev)
            if family == "vit":
                cams, (s, pred) = _vit_maps(visual, x, target_fn_for(yb), blocks)
            else:
                cams, (s, pred) = _gradcam_maps(visual, x, target_fn_for(yb))
            maps.append(_postprocess(cams, out_size))
            preds.append(pred)
            targets.append(s.float())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    maps_t = torch.cat(maps) if maps else torch.zeros(0, *out_size, device=dev)
    pred_t = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=dev)
    method = "gradcam" if family == "resnet" else f"chefer-{blocks}"
    return Heatmaps(maps_t, pred_t, pred_t == y.to(dev), torch.cat(targets) if targets else pred_t.float(), method)
