"""Prediction rationality: Prediction Trustworthiness (PT) and Inference Reliability (IR) of explanation heatmaps
against ground-truth object masks (Wang et al., AAAI 2025; spec: ``shared/specs/methods_rationality.md`` §1).

Per sample i, with heatmap ``H_i >= 0`` (explaining the **ground-truth** class, even when the prediction is wrong)
and boolean mask ``M_i`` of the same size:

* ``RMA_i = sum(H_i * M_i) / sum(H_i)`` (relevance mass accuracy; with a box mask, Score-CAM's energy pointing
  game); ``valid_i = RMA_i >= threshold`` (0.5);
* counts ``RR = #(correct, valid)``, ``RW = #(correct, not valid)``, ``WR = #(wrong, valid)``,
  ``WW = #(wrong, not valid)``; ``PT = RR / (RR + RW)`` = P(valid | correct), ``IR = RR / (RR + WR)`` =
  P(correct | valid); NaN for an empty denominator; ``mean_rma_correct`` = mean RMA over the correct predictions.

**Constant heatmaps** (``max == min``, including all-zero: min–max normalisation is undefined and the reference
turns them into NaN, which its ``NaN < 0.5`` test then counts as *valid*) are counted **invalid** here, get
``rma = NaN`` and are reported in ``n_constant``.

Everything runs on the heatmaps' device in one batched pass (float32 sums; no host sync until the result is read).
Masks come from :func:`masks_from_boxes` (union of boxes, as the reference draws them) or any boolean map —
segmentation masks, rasterised polygons — resized with the images (:func:`resize_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["RationalityResult", "masks_from_boxes", "masks_from_polygons", "rationality", "resize_masks"]


@dataclass
class RationalityResult:
    """``rma`` (N,) float32 (NaN for constant heatmaps), ``valid`` / ``correct`` (N,) bool, ``counts`` dict of the
    four cells, ``pt`` / ``ir`` / ``mean_rma_correct`` floats (fractions; NaN for an empty denominator),
    ``n_constant`` (heatmaps with no contrast, counted invalid), ``threshold``."""

    rma: torch.Tensor
    valid: torch.Tensor
    correct: torch.Tensor
    counts: dict[str, int]
    pt: float
    ir: float
    mean_rma_correct: float
    n_constant: int
    threshold: float

    def as_dict(self, percent: bool = False) -> dict[str, Any]:
        k = 100.0 if percent else 1.0
        return {"pt": k * self.pt, "ir": k * self.ir, "mean_rma_correct": self.mean_rma_correct,
                **self.counts, "n_constant": self.n_constant, "n": int(self.rma.shape[0]), "threshold": self.threshold}


def _check(heatmaps: Any, masks: Any, correct: Any, threshold: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(heatmaps, torch.Tensor) or not heatmaps.is_floating_point():
        raise TypeError(f"heatmaps: expected a floating tensor (N, H, W), got "
                        f"{heatmaps.dtype if isinstance(heatmaps, torch.Tensor) else type(heatmaps).__name__}")
    if heatmaps.dim() != 3:
        raise ValueError(f"heatmaps: expected shape (N, H, W), got {tuple(heatmaps.shape)}")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError(f"masks: expected a bool tensor (N, H, W), got "
                        f"{masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__}")
    if masks.shape != heatmaps.shape:
        raise ValueError(f"masks: expected the heatmaps' shape {tuple(heatmaps.shape)}, got {tuple(masks.shape)}")
    if not isinstance(correct, torch.Tensor) or correct.dtype != torch.bool:
        raise TypeError(f"correct: expected a bool tensor (N,), got "
                        f"{correct.dtype if isinstance(correct, torch.Tensor) else type(correct).__name__}")
    if tuple(correct.shape) != (heatmaps.shape[0],):
        raise ValueError(f"correct: expected shape ({heatmaps.shape[0]},), got {tuple(correct.shape)}")
    for name, t in (("masks", masks), ("correct", correct)):
        if t.device != heatmaps.device:
            raise ValueError(f"{name}: expected on the heatmaps' device {heatmaps.device}, got {t.device}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    if heatmaps.shape[0] and bool((heatmaps < 0).any()):
        raise ValueError("heatmaps: expected non-negative relevance (min-max normalised maps), got negative values")
    return heatmaps, masks, correct


def rationality(heatmaps: torch.Tensor, masks: torch.Tensor, correct: torch.Tensor,
                threshold: float = 0.5) -> RationalityResult:
    """PT, IR, RMA and the four counts (module docs) of ``heatmaps (N, H, W)`` (non-negative), ``masks (N, H, W)``
    bool and ``correct (N,)`` bool."""
    h, m, c = _check(heatmaps, masks, correct, threshold)
    n = h.shape[0]
    hf = h.float().reshape(n, h.shape[1] * h.shape[2])
    total = hf.sum(1)
    inside = (hf * m.reshape(n, h.shape[1] * h.shape[2])).sum(1)
    constant = hf.amax(1) == hf.amin(1) if n else torch.zeros(0, dtype=torch.bool, device=h.device)
    rma = torch.where(constant, torch.full_like(total, float("nan")), inside / total.clamp_min(1e-30))
    valid = (rma >= threshold) & ~constant
    rr = int((c & valid).sum())
    rw = int((c & ~valid).sum())
    wr = int((~c & valid).sum())
    ww = int((~c & ~valid).sum())
    nan = float("nan")
    rc = rma[c & ~constant]
    return RationalityResult(
        rma=rma, valid=valid, correct=c, counts={"RR": rr, "RW": rw, "WR": wr, "WW": ww},
        pt=rr / (rr + rw) if rr + rw else nan, ir=rr / (rr + wr) if rr + wr else nan,
        mean_rma_correct=float(rc.mean()) if rc.numel() else nan, n_constant=int(constant.sum()),
        threshold=float(threshold))


def masks_from_boxes(boxes: torch.Tensor | Sequence[torch.Tensor], size: int | tuple[int, int],
                     *, device: Any = None) -> torch.Tensor:
    """Boolean masks ``(N, H, W)``: the union of each sample's boxes drawn filled. ``boxes``: ``(N, 4)`` or a list
    of ``(K_i, 4)`` tensors in pixel coordinates ``(x0, y0, x1, y1)`` of the ``size`` grid (pixel ``(y, x)`` is
    inside when its centre ``(x + 0.5, y + 0.5)`` lies in ``[x0, x1) x [y0, y1)``)."""
    hgt, wid = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes: expected (N, 4) or a list of (K, 4), got {tuple(boxes.shape)}")
        boxes = [b[None] for b in boxes]
    dev = device if device is not None else (boxes[0].device if len(boxes) else "cpu")
    ys = torch.arange(hgt, device=dev, dtype=torch.float32) + 0.5
    xs = torch.arange(wid, device=dev, dtype=torch.float32) + 0.5
    out = torch.zeros(len(boxes), hgt, wid, dtype=torch.bool, device=dev)
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b, dtype=torch.float32, device=dev).reshape(-1, 4)
        if b.numel() == 0:
            continue
        iny = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])  # (K, H)
        inx = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])  # (K, W)
        out[i] = (iny[:, :, None] & inx[:, None, :]).any(0)
    return out


def masks_from_polygons(polygons: Sequence[Sequence[Any]], size: int | tuple[int, int], *,
                        device: Any = None) -> torch.Tensor:
    """Boolean masks ``(N, H, W)``: the union of each sample's polygons, filled by the even-odd rule at pixel
    centres (pixel ``(y, x)`` is inside when ``(x + 0.5, y + 0.5)`` is; COCO-style object outlines).
    ``polygons[i]``: a list of polygons of sample ``i``, each ``(V, 2)`` ``(x, y)`` vertices in pixels of the
    ``size`` grid (or a flat ``[x0, y0, x1, y1, ...]`` list, COCO's format), ``V >= 3``."""
    hgt, wid = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if isinstance(polygons, torch.Tensor) or not isinstance(polygons, (list, tuple)):
        raise TypeError(f"polygons: expected a list (one entry per sample) of lists of (V, 2) vertices, got "
                        f"{type(polygons).__name__}")
    dev = device if device is not None else "cpu"
    ys = torch.arange(hgt, device=dev, dtype=torch.float64) + 0.5
    xs = torch.arange(wid, device=dev, dtype=torch.float64) + 0.5
    py, px = ys[:, None].expand(hgt, wid), xs[None, :].expand(hgt, wid)
    out = torch.zeros(len(polygons), hgt, wid, dtype=torch.bool, device=dev)
    for i, polys in enumerate(polygons):
        if not isinstance(polys, (list, tuple)):
            raise TypeError(f"polygons[{i}]: expected a list of polygons, got {type(polys).__name__}")
        for j, poly in enumerate(polys):
            v = torch.as_tensor(poly, dtype=torch.float64, device=dev)
            if v.dim() == 1 and v.numel() % 2 == 0:
                v = v.reshape(-1, 2)
            if v.dim() != 2 or v.shape[1] != 2 or v.shape[0] < 3:
                raise ValueError(f"polygons[{i}][{j}]: expected (V, 2) vertices with V >= 3, got shape "
                                 f"{tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise ValueError(f"polygons[{i}][{j}]: expected finite vertices")
            inside = torch.zeros(hgt, wid, dtype=torch.bool, device=dev)
            x0, y0 = v[:, 0], v[:, 1]
            x1, y1 = v.roll(-1, 0)[:, 0], v.roll(-1, 0)[:, 1]
            for a in range(v.shape[0]):  # crossing test per edge: vectorised over the pixels
                if y0[a] == y1[a]:
                    continue
                cross = ((y0[a] > py) != (y1[a] > py)) & (
                    px < x0[a] + (py - y0[a]) * (x1[a] - x0[a]) / (y1[a] - y0[a]))
                inside ^= cross
            out[i] |= inside
    return out


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Boolean masks ``(N, h, w)`` resized to ``size`` as the images are (:func:`vlmfast.models.preprocess` resizes
    the whole image bilinearly): nearest-neighbour on pixel centres, so a mask stays aligned with its image."""
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(f"masks: expected a bool tensor (N, h, w), got {masks.dtype} {tuple(masks.shape)}")
    hgt, wid = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(masks.shape[-2:]) == (hgt, wid):
        return masks
    return F.interpolate(masks[:, None].float(), size=(hgt, wid), mode="nearest-exact")[:, 0] > 0.5
