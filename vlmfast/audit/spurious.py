"""RaVL spurious-correlation discovery (Varma et al., NeurIPS 2024), vectorised and matrix-free.

Two entry points:

* :func:`discover_from_scores` takes what the reference's ``ravl.discover.discover`` takes -- region
  embeddings, image labels and zero-shot predictions, image and region zero-shot score distributions and the
  number of regions per image -- so its results compare one to one with the official implementation;
* :func:`discover` computes those from a model and a dataset (region embeddings with
  :func:`vlmfast.audit.regions.region_embeddings`, zero-shot scores with the class prompts at temperature 0.07)
  and then calls :func:`discover_from_scores`.

**Semantics** (the official ``ravl/discover.py`` and ``ravl/discover_utils.py``; ``C`` classes, ``I_c`` = the
images with at least one region in cluster c, correct_i = (prediction_i == label_i)):

1. clustering: :func:`vlmfast.cluster.sweep` over ``ks`` (default ``range(2C, 5C)``) with
   ``clip_distances=True`` (the reference's ``clip(1 - E E^T, 0, 1)``) -- or a given ``clusters=``/``medoids=``;
2. per class l with images both in and out of ``I_c``: ``g(c, l) = 2 min(n_in, n_out) / (n_in + n_out) *
   (acc_in - acc_out)``; the gap ``G_c = sum_l |g(c, l)|`` (summed in the reference's order, so equal to the
   last bit); the spurious criterion: some g > 0 and some g < 0;
3. influence ``H_c``: over the images of ``I_c`` with more than one region that are misclassified and whose
   class l has g(c, l) < 0, the fraction whose most predictive region for the predicted class (argmax of the
   image scores; first maximum) lies in c, per class l; H_c = the largest of those fractions, -inf if none;
4. keep the clusters that satisfy the criterion with ``H_c >= threshold`` (0.25), in decreasing order of G_c
   (``numpy.argsort(G)[::-1]``, as the reference, ties included); rank each kept cluster's regions by
   similarity to its medoid (the reference's numpy expression, ties included).

Everything is computed with a presence matrix (clusters x images) times one-hot labels -- no per-cluster loop
over images. Differences from the reference, all on inputs where it fails or is ill-defined: nothing passing
the filter gives an empty result (the reference raises IndexError); no k with a positive silhouette picks the
best one with a note (the reference calls KMedoids(0)); cluster ids are the given labels, not their position
in the sorted list of ids (identical for ids 0..k-1, which KMedoids produces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["ClassRow", "SpuriousCluster", "SpuriousResult", "discover", "discover_from_scores", "precision_at_k",
           "zero_shot_scores", "MNIST_TEMPLATES"]

#: the reference's MNIST prompt templates (ravl/zeroshot_utils.py)
MNIST_TEMPLATES = ("a photo of the number {}", "the digit {}", "an image of a {}", "{}")


@dataclass
class ClassRow:
    """One row of a cluster's per-class table: accuracy with the cluster's feature present / absent (images
    with / without a region in the cluster, unweighted) and the weighted gap g(c, l)."""

    label: int
    acc_present: float
    n_present: int
    acc_absent: float
    n_absent: int
    gap: float
    name: str | None = None

    def __str__(self) -> str:
        who = self.name if self.name is not None else str(self.label)
        return (f"{who}: present {self.acc_present:.3f} ({self.n_present}) | absent {self.acc_absent:.3f} "
                f"({self.n_absent}) | g {self.gap:+.4f}")


@dataclass
class SpuriousCluster:
    """A kept cluster: its ``id``, performance ``gap`` G_c, ``influence`` H_c, ``regions`` (region indices
    ranked by similarity to the medoid), ``medoid`` (region index), ``table`` (per-class rows in the
    reference's order), ``images`` (indices of the images with a region in it) and ``attribute``: the class
    whose accuracy the feature raises most (acc_present - acc_absent), the spuriously correlated attribute."""

    id: int
    gap: float
    influence: float
    regions: list[int]
    medoid: int
    table: list[ClassRow]
    images: np.ndarray
    attribute: int | None = None
    attribute_name: str | None = None

    def format_table(self) -> str:
        lines = ["| class | acc present (n) | acc absent (n) | g(c, l) |", "|---|---|---|---|"]
        for r in self.table:
            who = r.name if r.name is not None else str(r.label)
            lines.append(f"| {who} | {r.acc_present:.3f} ({r.n_present}) | {r.acc_absent:.3f} ({r.n_absent}) | "
                         f"{r.gap:+.4f} |")
        return "\n".join(lines)


@dataclass
class SpuriousResult:
    """Discovery output: the clustering (``k``, ``silhouette``, ``labels`` (R,), ``medoids`` (k,),
    ``silhouettes`` {k: score} of the sweep), per-cluster arrays over the cluster ids 0..K-1 (``gaps``,
    ``influence``, ``criterion``) and ``clusters``: the kept clusters in rank order (empty when nothing passes
    the filter: ``found`` is then False). ``top`` is the first kept cluster or None."""

    k: int
    silhouette: float | None
    labels: np.ndarray
    medoids: np.ndarray
    gaps: np.ndarray
    influence: np.ndarray
    criterion: np.ndarray
    clusters: list[SpuriousCluster]
    silhouettes: dict[int, float] = field(default_factory=dict)
    threshold: float = 0.25
    notes: list[str] = field(default_factory=list)
    #: ``(K, d)`` float32: the embedding of every cluster's medoid (row = cluster id; the frozen clustering that
    #: the mitigation assigns fine-tuning regions to, :func:`vlmfast.tuning.region.split_regions`)
    medoid_embeddings: np.ndarray | None = None

    @property
    def spurious_ids(self) -> list[int]:
        """The ids of the kept clusters, in rank order."""
        return [c.id for c in self.clusters]

    @property
    def found(self) -> bool:
        return bool(self.clusters)

    @property
    def top(self) -> SpuriousCluster | None:
        return self.clusters[0] if self.clusters else None

    def summary(self) -> str:
        head = (f"k = {self.k}" + (f" (silhouette {self.silhouette:.3f})" if self.silhouette is not None else "")
                + f"; {len(self.clusters)} of {len(self.gaps)} clusters pass the filter (criterion and H >= "
                f"{self.threshold})")
        if not self.clusters:
            return head + ": no spurious feature found"
        t = self.top
        who = t.attribute_name if t.attribute_name is not None else t.attribute
        return head + (f"; top cluster {t.id}: G = {t.gap:.4f}, H = {t.influence:.3f}, {len(t.regions)} regions, "
                       f"attribute {who}")


# ------------------------------------------------------------------------------------------------ helpers

def _np(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, (list, tuple)):
        return np.asarray(a)
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"{name}: expected a numpy array, torch tensor or list, got {type(a).__name__}")


def _ints(a: Any, name: str, n: int | None = None) -> np.ndarray:
    a = _np(a, name)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"{name}: expected shape ({n if n is not None else 'N'},), got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _set_order(labels_in_order: list[int]) -> list[int]:
    """The iteration order of ``set(...)`` built from these labels in this (first-appearance) order: the
    reference iterates a Python set of the in-cluster labels, which fixes the order of its gap sum."""
    return list(set(labels_in_order))


def _region_argmax(region_scores: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                   cls: np.ndarray) -> np.ndarray:
    """For every image, the index of its region with the largest score for class ``cls[i]`` (first maximum);
    -1 for an image with no region."""
    n = counts.shape[0]
    width = int(counts.max()) if n else 0
    out = np.full(n, -1, dtype=np.int64)
    if width == 0:
        return out
    slot = np.arange(width)[None, :]
    valid = slot < counts[:, None]
    ridx = np.where(valid, starts[:, None] + slot, 0)
    vals = region_scores[ridx, cls[:, None]].astype(np.float64)
    vals = np.where(valid, vals, -np.inf)
    best = np.argmax(vals, axis=1)
    has = counts > 0
    out[has] = (starts + best)[has]
    return out


# ------------------------------------------------------------------------------------------------ scoring

def _score_clusters(cl: np.ndarray, ids: np.ndarray, image_of: np.ndarray, y: np.ndarray, pred: np.ndarray,
                    image_scores: np.ndarray, region_scores: np.ndarray, counts: np.ndarray, starts: np.ndarray,
                    n_classes: int):
    """Per cluster id (in ``ids`` order): gaps G, criterion, influence H, tables, image sets."""
    n = y.shape[0]
    kk = ids.shape[0]
    pos = np.searchsorted(ids, cl)  # cluster position of every region
    presence = np.zeros((kk, n), dtype=bool)
    presence[pos, image_of] = True
    onehot = np.zeros((n, n_classes), dtype=np.float64)
    onehot[np.arange(n), y] = 1.0
    correct = (pred == y)
    pres_f = presence.astype(np.float64)
    n_in = pres_f @ onehot                              # (K, C)
    cor_in = pres_f @ (onehot * correct[:, None])
    n_all = onehot.sum(0)
    cor_all = (onehot * correct[:, None]).sum(0)
    n_out = n_all[None, :] - n_in
    cor_out = cor_all[None, :] - cor_in
    valid = (n_in > 0) & (n_out > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_in = cor_in / n_in
        acc_out = cor_out / n_out
        weight = (np.minimum(n_in, n_out) / (n_in + n_out)) * 2
        g = weight * (acc_in - acc_out)
    g = np.where(valid, g, np.nan)

    # first appearance (image index) of each class in each cluster: fixes the reference's set order
    big = n + 1
    first = np.full((kk, n_classes), big, dtype=np.int64)
    ci, ii = np.nonzero(presence)
    np.minimum.at(first, (ci, y[ii]), ii)

    gaps = np.zeros(kk, dtype=np.float64)
    tables: list[list[tuple[int, float, int, float, int, float]]] = []
    for c in range(kk):  # a loop over clusters and their classes only (C entries each), never over images
        present = np.nonzero(first[c] < big)[0]
        order = _set_order([int(l) for l in present[np.argsort(first[c, present], kind="stable")]])
        total = 0
        rows = []
        for l in order:
            if not valid[c, l]:
                continue
            total = total + np.abs(g[c, l])
            rows.append((l, float(acc_in[c, l]), int(n_in[c, l]), float(acc_out[c, l]), int(n_out[c, l]),
                         float(g[c, l])))
        gaps[c] = total
        tables.append(rows)
    with np.errstate(invalid="ignore"):
        criterion = (np.nan_to_num(g, nan=0.0) > 0).any(1) & (np.nan_to_num(g, nan=0.0) < 0).any(1)

    # influence: the most predictive region (for the predicted class) of every multi-region image
    pred_cls = np.argmax(image_scores, axis=1)
    best_region = _region_argmax(region_scores, starts, counts, pred_cls)
    best_pos = np.where(best_region >= 0, pos[np.maximum(best_region, 0)], -1)
    harmed = valid & (np.nan_to_num(g, nan=0.0) < 0)              # (K, C)
    eligible = presence & (counts > 1)[None, :] & (~correct)[None, :] & harmed[:, y]
    hit = eligible & (best_pos[None, :] == np.arange(kk)[:, None])
    den = eligible.astype(np.float64) @ onehot
    num = hit.astype(np.float64) @ onehot
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(den > 0, num / den, -np.inf)
    influence = frac.max(1) if n_classes else np.full(kk, -np.inf)
    return gaps, criterion, influence, tables, presence


# -------------------------------------------------------------------------------------------- entry points

def discover_from_scores(region_embeddings: Any, labels: Any, predictions: Any, image_scores: Any,
                         region_scores: Any, regions_per_image: Any, *, ks: Sequence[int] | None = None,
                         clusters: Any = None, medoids: Any = None, clip_distances: bool = True,
                         threshold: float = 0.25, seed: int = 0, class_names: Sequence[str] | None = None,
                         device: Any = None, progress: bool = False) -> SpuriousResult:
    """RaVL discovery on precomputed arrays (the inputs of the reference's ``discover``; see the module
    docstring). ``region_embeddings`` (R, d), L2-normalised; ``labels``/``predictions`` (N,) class indices
    0..C-1; ``image_scores`` (N, C) and ``region_scores`` (R, C) zero-shot score distributions;
    ``regions_per_image`` (N,) with sum R, regions image-major. ``ks``: candidate k (default
    ``range(2C, 5C)``). ``clusters`` (R,) cluster ids (and optionally ``medoids``, region indices per id)
    skip the clustering; without ``medoids`` each cluster's exact medoid is used. ``clip_distances``: the
    reference's clipping (default; exact, costs one pass over all pairs). ``threshold``: the influence filter."""
    from vlmfast.cluster import medoids_of, sweep

    emb = _np(region_embeddings, "region_embeddings")
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"region_embeddings: expected a float (R, d) array, got {emb.dtype} {emb.shape}")
    r = emb.shape[0]
    y = _ints(labels, "labels")
    n = y.shape[0]
    pred = _ints(predictions, "predictions", n)
    img_s = _np(image_scores, "image_scores")
    if img_s.ndim != 2 or img_s.shape[0] != n:
        raise ValueError(f"image_scores: expected shape ({n}, C), got {img_s.shape}")
    n_classes = img_s.shape[1]
    reg_s = _np(region_scores, "region_scores")
    if reg_s.shape != (r, n_classes):
        raise ValueError(f"region_scores: expected shape ({r}, {n_classes}), got {reg_s.shape}")
    counts = _ints(regions_per_image, "regions_per_image", n)
    if (counts < 0).any() or int(counts.sum()) != r:
        raise ValueError(f"regions_per_image: expected non-negative counts summing to R = {r}, got sum "
                         f"{int(counts.sum())}" + (" with negative entries" if (counts < 0).any() else ""))
    for name, a in (("labels", y), ("predictions", pred)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name}: expected class indices in 0..{n_classes - 1}, got range "
                             f"{a.min()}..{a.max()}")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"class_names: expected {n_classes} names, got {len(class_names)}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
    if r == 0:
        raise ValueError("region_embeddings: expected at least one region, got 0")
    notes: list[str] = []
    sil_scores: dict[int, float] = {}
    if clusters is None:
        if medoids is not None:
            raise ValueError("medoids: given without clusters; pass clusters= too, or neither")
        ks = list(range(2 * n_classes, 5 * n_classes)) if ks is None else [int(k) for k in ks]
        res = sweep(emb, ks, metric="dot", clip_distances=clip_distances, seed=seed, device=device,
                    progress=progress)
        cl = res.labels.cpu().numpy().astype(np.int64)
        med = res.medoids.cpu().numpy().astype(np.int64)
        k, sil, sil_scores = res.k, res.silhouette, res.scores
        if res.note:
            notes.append(res.note)
    else:
        cl = _ints(clusters, "clusters", r)
        if cl.size and cl.min() < 0:
            raise ValueError(f"clusters: expected non-negative cluster ids, got min {cl.min()}")
        if medoids is None:
            med = medoids_of(emb, cl, metric="dot", clip_distances=clip_distances).cpu().numpy()
        else:
            med = _ints(medoids, "medoids")
            if med.shape[0] <= cl.max():
                raise ValueError(f"medoids: expected one region index per cluster id 0..{cl.max()}, got "
                                 f"{med.shape[0]}")
            if med.size and (med.min() < 0 or med.max() >= r):
                raise ValueError(f"medoids: expected region indices in 0..{r - 1}, got range {med.min()}..{med.max()}")
        k, sil = int(np.unique(cl).size), None
    ids = np.unique(cl)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    image_of = np.repeat(np.arange(n), counts)
    gaps, crit, infl, tables, presence = _score_clusters(cl, ids, image_of, y, pred, img_s, reg_s, counts,
                                                         starts, n_classes)
    # the reference: argsort of the gap list, reversed, then the filter
    order = np.argsort(np.array(gaps))[::-1]
    kept = [a for a in order if bool(crit[a]) and infl[a] >= threshold]
    out: list[SpuriousCluster] = []
    for a in kept:
        cid = int(ids[a])
        m = int(med[cid])
        members = np.where(cl == cid)[0]
        medoid = emb[m].reshape(1, -1)
        ranked = members[np.argsort((emb[members] @ medoid.T).flatten())[::-1]].tolist()
        rows = [ClassRow(l, ai, ni, ao, no, gg, None if class_names is None else class_names[l])
                for (l, ai, ni, ao, no, gg) in tables[a]]
        attr = max(rows, key=lambda row: row.acc_present - row.acc_absent).label if rows else None
        out.append(SpuriousCluster(id=cid, gap=float(gaps[a]), influence=float(infl[a]), regions=ranked, medoid=m,
                                   table=rows, images=np.nonzero(presence[a])[0], attribute=attr,
                                   attribute_name=None if (attr is None or class_names is None)
                                   else class_names[attr]))
    if not out:
        notes.append(f"no cluster satisfies the spurious criterion with influence >= {threshold}")
    full = lambda v, fill: _by_id(ids, v, fill)  # noqa: E731
    return SpuriousResult(k=int(k), silhouette=sil, labels=cl, medoids=med, gaps=full(gaps, np.nan),
                          influence=full(infl, -np.inf), criterion=full(crit, False), clusters=out,
                          silhouettes=sil_scores, threshold=float(threshold), notes=notes,
                          medoid_embeddings=np.ascontiguousarray(emb[med], dtype=np.float32) if med.size else None)


def _by_id(ids: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    size = int(ids.max()) + 1 if ids.size else 0
    out = np.full(size, fill, dtype=values.dtype)
    out[ids] = values
    return out


def precision_at_k(result: SpuriousResult | Sequence[int], region_is_feature: Any, k: int = 10) -> float:
    """Precision@k of the top cluster's ranked regions: the fraction of its first ``k`` regions whose
    ground-truth label is the planted feature (``region_is_feature`` (R,) bool). 0.0 when nothing was found;
    a cluster with fewer than k regions is scored over k all the same (missing regions count as misses)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    truth = _np(region_is_feature, "region_is_feature").astype(bool)
    regions = result.top.regions if isinstance(result, SpuriousResult) and result.found else (
        [] if isinstance(result, SpuriousResult) else list(result))
    top = np.asarray(regions[:k], dtype=np.int64)
    if top.size and top.max() >= truth.shape[0]:
        raise ValueError(f"region_is_feature: expected one entry per region (>= {top.max() + 1}), got "
                         f"{truth.shape[0]}")
    return float(truth[top].sum()) / k if top.size else 0.0


# ------------------------------------------------------------------------------------------- image level

def zero_shot_scores(embeddings: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.07
                     ) -> torch.Tensor:
    """softmax(e . t_c / temperature) over classes, e and t L2-normalised (the reference's ``zero_shot_cls``)."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    t = torch.nn.functional.normalize(text_features.float().to(e.device), dim=-1)
    return (e @ t.T / temperature).softmax(-1)


def discover(model: Any, data: Any, classnames: Sequence[str], *, templates: Sequence[str] = MNIST_TEMPLATES,
             boxes: Any = None, text_features: torch.Tensor | None = None, text_model: Any = None,
             temperature: float = 0.07, method: str = "auto", batch_size: int = 256, device: Any = None,
             progress: bool = False, **kwargs) -> SpuriousResult:
    """RaVL discovery for a model on a labelled evaluation set: region embeddings of ``boxes`` (default: the
    dataset's ``region_boxes``, e.g. spurious-MNIST quadrants) with
    :func:`vlmfast.audit.regions.region_embeddings`, zero-shot scores of images and regions against
    ``classnames`` x ``templates`` (each prompt normalised, averaged per class, renormalised; from
    ``text_model``'s text tower, default the model's own, or given ``text_features`` (C, D)) at
    ``temperature``, then :func:`discover_from_scores` (``kwargs``: ks, clusters, medoids, clip_distances,
    threshold, seed)."""
    from vlmfast.audit.regions import region_embeddings
    from vlmfast.models.text import zero_shot_head

    if text_features is None:
        text_features = zero_shot_head(text_model if text_model is not None else model, list(classnames),
                                       list(templates))
    reg = region_embeddings(model, data, boxes, method=method, batch_size=batch_size, device=device,
                            progress=progress)
    img_scores = zero_shot_scores(reg.image_embeddings, text_features, temperature)
    reg_scores = zero_shot_scores(reg.embeddings, text_features, temperature)
    labels = torch.as_tensor(getattr(data, "labels")).long().cpu()
    preds = img_scores.argmax(1).cpu()
    return discover_from_scores(reg.embeddings.cpu(), labels, preds, img_scores.cpu(), reg_scores.cpu(),
                                reg.regions_per_image.cpu(), class_names=list(classnames), progress=progress,
                                **kwargs)
