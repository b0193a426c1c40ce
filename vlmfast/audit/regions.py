"""Region embeddings for the spurious-correlation audit (RaVL stage 1) and its mitigation (stage 2).

:func:`region_embeddings` runs :func:`vlmfast.models.region_features` over a dataset, a stream or an image tensor,
batch by batch on the model's device, and returns everything the audit needs in one
:class:`RegionEmbeddings`: the L2-normalised region embeddings ``(R, D)`` in image-major order, the number of
regions per image, the image of every region, the boxes, and the image embeddings from the **same forward**
(ResNet ``roi``: the shared trunk; ViT ``patch``: the CLS token of the one forward; ``crop``: one extra
``encode_image``).

Methods (``vlmfast.models.regions`` has the details):

=========  ===============================  ===========================================================
``roi``    open_clip ModifiedResNet          trunk once per image to ``layer``, RoIAlign every box, then
                                             the remaining stages + attention pool (ViLLA / RaVL)
``patch``  open_clip VisionTransformer       one forward per image; final patch tokens averaged under the
                                             box (covered fraction per patch), then ``ln_post`` + ``proj``
``crop``   any tower                         crop-and-encode: every box resized to the input size and
                                             encoded (one forward per region; the parity mode)
``auto``   roi for a ResNet, patch for a ViT, crop otherwise
=========  ===============================  ===========================================================

Inference only by default (``torch.no_grad()``; ``grad=True`` keeps the graph, for small batches); CUDA batches
run under bfloat16 autocast unless ``amp=False``. The result lives on the CPU (``keep_on_device=True`` keeps it on
the model's device).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class RegionEmbeddings(NamedTuple):
    """What :func:`region_embeddings` returns."""

    embeddings: Tensor  # (R, D) float32, L2-normalised, image-major
    regions_per_image: Tensor  # (N,) int64
    image_index: Tensor  # (R,) int64: the image of each region
    boxes: Tensor  # (R, 4) float32 [x1, y1, x2, y2] in pixels of the images as given
    image_embeddings: Tensor  # (N, D) float32, L2-normalised (same forward)
    method: str  # the resolved method: roi | patch | crop

    @property
    def num_images(self) -> int:
        return int(self.regions_per_image.shape[0])

    def padded(self) -> tuple[Tensor, Tensor]:
        """``(embeddings (N, Kmax, D) zero-padded, mask (N, Kmax) bool)``: the layout of the region loss."""
        n = self.num_images
        kmax = int(self.regions_per_image.max()) if n else 0
        start = torch.zeros(n, dtype=torch.long)
        if n > 1:
            start[1:] = self.regions_per_image[:-1].cumsum(0)
        pos = torch.arange(self.embeddings.shape[0]) - start[self.image_index]
        out = self.embeddings.new_zeros(n, kmax, self.embeddings.shape[1])
        mask = torch.zeros(n, kmax, dtype=torch.bool)
        out[self.image_index, pos] = self.embeddings
        mask[self.image_index, pos] = True
        return out, mask


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {v}")
    return v


def _boxes_of_batch(b: dict, boxes: Any, offset: int, m: int) -> Any:
    if boxes is not None:
        if offset + m > len(boxes):
            raise ValueError(f"boxes: expected one entry per image, got {len(boxes)} for {offset + m}+ images")
        return boxes[offset:offset + m]
    if isinstance(b.get("region_boxes"), torch.Tensor):
        return b["region_boxes"]
    if isinstance(b.get("box"), torch.Tensor):
        bb = b["box"]
        if bb.dim() != 2 or bb.shape[-1] != 4:
            raise ValueError(f"boxes: expected the batches' 'box' field of shape (B, 4), got {tuple(bb.shape)}")
        if bool((bb < 0).all(dim=-1).any()):
            raise ValueError("boxes: a sample has no box (-1s); pass boxes= for every image")
        return bb[:, None]
    raise ValueError("boxes: the data has no 'region_boxes' or 'box' field; pass boxes=")


def region_embeddings(model: torch.nn.Module, data: Any, boxes: Tensor | Sequence[Tensor] | None = None, *,
                      method: str = "auto", layer: str = "auto", patch_pool: str = "attn", batch_size: int = 256,
                      device: Any = None,
                      normalize: bool = True, grad: bool = False, amp: bool = True, keep_on_device: bool = False,
                      progress: bool = False) -> RegionEmbeddings:
    """Region and image embeddings of ``data`` (module docstring).

    Args:
        model: an open_clip CLIP model (its image tower decides what ``method="auto"`` means).
        data: ``(N, 3, H, W)`` uint8 images, a dataset with ``.images`` (and ``region_boxes``, like
            spurious-MNIST), an :class:`~vlmfast.data.ImageFolderStream`, a torch ``Dataset`` or ``DataLoader``.
        boxes: ``(N, K, 4)`` or a list of ``(K_i, 4)`` boxes ``[x1, y1, x2, y2]`` in pixels of the images as
            given; default: each batch's ``region_boxes`` (or its single ``box``).
        method: ``"auto"``, ``"roi"``, ``"patch"`` or ``"crop"``. ``layer``: the ResNet cut for ``roi``.
        patch_pool: ViT ``patch`` pooling: ``"attn"`` (masked CLS attention in the last block, the default) or
            ``"mean"`` (covered-fraction mean of the final patch tokens).
        batch_size: images per forward. ``device``: move the model there first (default: where it is).
        grad: keep the autograd graph (default: inference under ``no_grad``).
        progress: a progress bar over the batches (tqdm when installed).
    """
    from vlmfast.data.stream import iter_batches, num_batches
    from vlmfast.models.regions import METHODS, _prepare, _region_forward
    from vlmfast.models.text import _progress

    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    if boxes is not None and not isinstance(boxes, (torch.Tensor, list, tuple)):
        raise TypeError(f"boxes: expected a Tensor (N, K, 4) or a list of (K_i, 4) tensors, got {type(boxes).__name__}")
    if device is not None:
        model = model.to(device)
    batches = iter_batches(data, batch_size, what="data")
    if progress:
        try:
            total = num_batches(data, batch_size)
        except Exception:
            total = None
        batches = _progress(batches, total=total, desc="region_embeddings")
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    regs, imgs, counts, all_boxes, resolved, offset = [], [], [], [], "", 0
    with ctx:
        for b in batches:
            x = b["image"]
            m = int(x.shape[0])
            bb = _boxes_of_batch(b, boxes, offset, m)
            prep = _prepare(model, x, bb, method)
            use_amp = amp and prep.x.device.type == "cuda"
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                r, im = _region_forward(model, prep, layer, None, 0, with_image=True, patch_pool=patch_pool)
            if normalize:
                r, im = F.normalize(r, dim=-1), F.normalize(im, dim=-1)
            if not keep_on_device:
                r, im = r.cpu(), im.cpu()
            regs.append(r)
            imgs.append(im)
            counts.extend(prep.counts)
            all_boxes.append(prep.rois[:, 1:].float().cpu())
            resolved = prep.method
            offset += m
    if boxes is not None and offset != len(boxes):
        raise ValueError(f"boxes: expected {offset} entries (one per image), got {len(boxes)}")
    if not regs:
        raise ValueError("data: yielded no images")
    per = torch.tensor(counts, dtype=torch.int64)
    return RegionEmbeddings(
        embeddings=torch.cat(regs),
        regions_per_image=per,
        image_index=torch.repeat_interleave(torch.arange(per.shape[0]), per),
        boxes=torch.cat(all_boxes),
        image_embeddings=torch.cat(imgs),
        method=resolved,
    )


__all__ = ["RegionEmbeddings", "region_embeddings"]
