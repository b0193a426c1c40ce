"""RaVL stage 2: region-aware fine-tuning that mitigates a discovered spurious feature.
Spec: ``shared/specs/methods_ravl.md`` section 2.

1. **Region split, once** (:func:`split_regions`): every fine-tuning image's regions (the same boxes as in
   discovery, e.g. the spurious-MNIST quadrants) are embedded by the **Stage-1 model** (a frozen snapshot: the
   model passed to :func:`fit`, before any step) and assigned to the nearest medoid (cosine; the op
   :func:`vlmfast.functional.kmeans_assign` with the medoids as centroids) of the Stage-1 clustering. Regions of
   the discovered spurious cluster(s) are ``spurious``; all others ``relevant``. The split does not change
   during training.
2. **Loss** per step on a random minibatch of image-caption pairs (class-template captions drawn per image per
   step, as FLYP): ``L = lam * L_CLIP + (1 - lam) * L_RaVL`` with ``lam = 0.8``. ``L_CLIP``: symmetric InfoNCE of
   the image and caption embeddings (the fused :func:`vlmfast.functional.clip_loss`, the model's learnable
   logit scale), both towers trained. ``L_RaVL``: the op :func:`vlmfast.functional.region_loss` (``L_R + L_A``
   per image, averaged over the images with a relevant region) on the batch's **differentiable** region
   embeddings from the trainable image tower (:func:`vlmfast.models.region_features`'s path; the ResNet trunk /
   ViT forward is shared with the image embedding: one image-tower pass per step), against the **frozen** class
   text embeddings of the Stage-1 model (its zero-shot head) at temperature 0.07.
3. ``lam=1`` is exactly the standard contrastive fine-tuning on the same batches and captions (the baseline the
   repro compares with: same code, same seeds).

Optimisation as :func:`vlmfast.tuning.robust.fit`: AdamW (decay on all parameters), linear warm-up then cosine,
bf16 autocast on CUDA, fp32 on CPU, resumable checkpoints (``checkpoint_dir``). Returns a
:class:`vlmfast.tuning.robust.RobustResult` (``method="ravl"``) whose classifier is the fine-tuned model's
zero-shot head.

:func:`evaluate_groups` scores a classifier the way the paper's mitigation table does: image accuracy overall and
worst-group (groups = class x presence of the spurious feature), and the region accuracy: zero-shot accuracy of the
digit region alone (and its worst group).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from vlmfast.tuning.robust import (RobustResult, _check_int, _check_real, _fit_inputs, _train_arrays, predict,
                                   zero_shot_classifier)

#: Defaults: lam 0.8 (the port's 0.8 / 0.2), temperature 0.07 (the reference's zero-shot temperature), FLYP's
#: lr / weight decay for the contrastive part.
DEFAULTS = dict(lam=0.8, temperature=0.07, lr=1e-5, weight_decay=0.1)


class RegionSplit(NamedTuple):
    """What :func:`split_regions` returns, per image and region (padded ``(N, K)`` layout)."""

    boxes: torch.Tensor  # (N, K, 4) float32
    cluster: torch.Tensor  # (N, K) int64: nearest Stage-1 medoid
    spurious: torch.Tensor  # (N, K) bool
    relevant: torch.Tensor  # (N, K) bool

    def summary(self) -> dict[str, Any]:
        s = self.spurious.sum(1)
        return {"images": int(self.boxes.shape[0]), "regions": int(self.relevant.numel()),
                "spurious_regions": int(self.spurious.sum()), "images_with_spurious": int((s > 0).sum())}


def _boxes_of(data: Any, boxes: Any) -> torch.Tensor:
    b = boxes if boxes is not None else getattr(data, "region_boxes", None)
    if b is None:
        raise ValueError("boxes: data has no .region_boxes; pass boxes=(N, K, 4)")
    b = torch.as_tensor(b)
    if b.dim() != 3 or b.shape[-1] != 4:
        raise ValueError(f"boxes: expected shape (N, K, 4), got {tuple(b.shape)}")
    return b.float()


def _medoids_and_ids(discovered: Any, medoid_embeddings: Any, spurious_ids: Any) -> tuple[torch.Tensor, list[int]]:
    if discovered is not None:
        if medoid_embeddings is None:
            medoid_embeddings = getattr(discovered, "medoid_embeddings", None)
        if spurious_ids is None:
            spurious_ids = [c.id for c in getattr(discovered, "clusters", [])[:1]]
    if medoid_embeddings is None:
        raise ValueError("medoid_embeddings: expected the Stage-1 medoid embeddings (K, d) (or a discovery result "
                         "that carries them), got None")
    med = torch.as_tensor(np.asarray(medoid_embeddings), dtype=torch.float32)
    if med.dim() != 2 or med.shape[0] < 1:
        raise ValueError(f"medoid_embeddings: expected a (K, d) array with K >= 1, got shape {tuple(med.shape)}")
    ids = [int(i) for i in (spurious_ids or [])]
    if any(i < 0 or i >= med.shape[0] for i in ids):
        raise ValueError(f"spurious_ids: expected cluster ids in 0..{med.shape[0] - 1}, got {ids}")
    return med, ids


@torch.no_grad()
def split_regions(model: nn.Module, data: Any, medoid_embeddings: Any = None, spurious_ids: Sequence[int] | None = None,
                  *, discovered: Any = None, boxes: Any = None, method: str = "auto", batch_size: int = 256,
                  progress: bool = False) -> RegionSplit:
    """Assign every region of ``data`` to the nearest Stage-1 medoid (cosine) and mark the spurious ones.

    ``model``: the Stage-1 model (frozen; not modified). ``medoid_embeddings`` ``(K, d)`` and ``spurious_ids``
    (cluster ids), or ``discovered``: a :class:`vlmfast.audit.spurious.SpuriousResult` (its medoid embeddings
    and, by default, its top cluster). ``boxes``: ``(N, K, 4)`` (default ``data.region_boxes``)."""
    from vlmfast.audit.regions import region_embeddings
    from vlmfast.ops.kmeans_assign import kmeans_assign

    med, ids = _medoids_and_ids(discovered, medoid_embeddings, spurious_ids)
    b = _boxes_of(data, boxes)
    images, _ = _train_arrays(data)
    if b.shape[0] != images.shape[0]:
        raise ValueError(f"boxes: expected {images.shape[0]} rows (one per image), got {b.shape[0]}")
    was = model.training
    model.eval()
    try:
        reg = region_embeddings(model, images, b, method=method, batch_size=batch_size, progress=progress)
    finally:
        model.train(was)
    if reg.embeddings.shape[1] != med.shape[1]:
        raise ValueError(f"medoid_embeddings: expected width {reg.embeddings.shape[1]} (the model's embeddings), "
                         f"got {med.shape[1]}")
    lab = kmeans_assign(reg.embeddings, torch.nn.functional.normalize(med, dim=-1), metric="ip").labels
    cluster = lab.reshape(b.shape[0], b.shape[1])
    spur = torch.isin(cluster, torch.tensor(ids, dtype=torch.int64)) if ids else torch.zeros_like(cluster, dtype=torch.bool)
    return RegionSplit(boxes=b, cluster=cluster, spurious=spur, relevant=~spur)


def fit(
    model: nn.Module,
    data: Any,
    discovered: Any = None,
    *,
    medoid_embeddings: Any = None,
    spurious_ids: Sequence[int] | None = None,
    split: RegionSplit | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    steps: int = 300,
    batch_size: int = 128,
    lam: float = DEFAULTS["lam"],
    temperature: float = DEFAULTS["temperature"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int | None = None,
    grad_clip: float | None = None,
    seed: int = 0,
    region_method: str = "auto",
    precision: str = "auto",
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    progress: bool | None = None,
) -> RobustResult:
    """RaVL fine-tuning of a copy of ``model`` on ``data`` (module docstring); returns a
    :class:`~vlmfast.tuning.robust.RobustResult` with ``method="ravl"``.

    ``data``: ``.images`` uint8 ``(N, 3, H, W)``, ``.labels``, ``.region_boxes`` ``(N, K, 4)`` (or ``split``'s
    boxes) and ``.classnames`` (or ``classnames``). The spurious regions: ``split`` (from :func:`split_regions`), or
    computed here with the input model from ``discovered`` / ``medoid_embeddings`` + ``spurious_ids``. ``lam``: the
    weight of ``L_CLIP`` in [0, 1] (1: plain contrastive fine-tuning). ``warmup``: default 2 % of the steps.
    """
    from vlmfast.models.factory import get_tokenizer, preprocess_for, resolve_device
    from vlmfast.models.regions import _prepare, _region_forward
    from vlmfast.models.text import encode_truncated, fill_templates, text_parts, tokenize, zero_shot_head
    from vlmfast.ops.contrastive_loss import clip_loss
    from vlmfast.ops.region_loss import region_loss
    from vlmfast.train import EpochSampler, TrainConfig, step_generator
    from vlmfast.train import fit as train_fit

    images, labels, classnames, templates = _fit_inputs(model, data, classnames, templates)
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    lam = _check_real("lam", lam)
    if lam > 1:
        raise ValueError(f"lam: expected a weight in [0, 1], got {lam}")
    temperature = _check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    lr = _check_real("lr", lr)
    weight_decay = _check_real("weight_decay", weight_decay)
    if grad_clip is not None:
        grad_clip = _check_real("grad_clip", grad_clip)
    if warmup is None:
        warmup = min(max(1, round(0.02 * steps)), steps - 1) if steps > 1 else 0
    if device is not None:
        model = model.to(resolve_device(device))
    dev = next(model.parameters()).device

    if split is None:
        if lam < 1 or discovered is not None or medoid_embeddings is not None:
            split = split_regions(model, data, medoid_embeddings, spurious_ids, discovered=discovered,
                                  method=region_method)
    if split is not None and split.boxes.shape[0] != images.shape[0]:
        raise ValueError(f"split: expected {images.shape[0]} images like data, got {split.boxes.shape[0]}")
    zero_shot = zero_shot_classifier(model, classnames, templates)
    with torch.no_grad():
        text_frozen = zero_shot_head(model, classnames, templates).float().to(dev)  # Stage-1 class embeddings
    student = copy.deepcopy(model)
    tok = tokenize(fill_templates(classnames, templates), get_tokenizer(student)).to(dev)
    n, n_t = images.shape[0], len(templates)
    bs = min(batch_size, n)
    sampler = EpochSampler(n, bs, seed=seed)
    ys = labels.to(dev)

    def encode_text(m, t):
        p = text_parts(m)
        return encode_truncated(p, t) if p is not None else m.encode_text(t)

    def batches(step: int) -> dict[str, Any]:
        idx = sampler(step)
        tid = torch.randint(0, n_t, (idx.shape[0],), generator=step_generator(seed, step, "template"))
        return {"idx": idx, "cap": (labels[idx] * n_t + tid).to(dev)}

    use_regions = split is not None and lam < 1

    def loss_fn(b: dict[str, Any]) -> dict[str, Any]:
        idx = b["idx"]
        out: dict[str, Any] = {}
        if use_regions:
            prep = _prepare(student, images[idx], split.boxes[idx], region_method)
            reg, img = _region_forward(student, prep, "auto", None, 0, with_image=True)
            k = split.boxes.shape[1]
            rl = region_loss(reg.reshape(idx.shape[0], k, -1), text_frozen, ys[idx.to(dev)],
                             split.relevant[idx].to(dev), split.spurious[idx].to(dev), temperature=temperature)
            out["ravl"] = rl.loss.detach()
        else:
            img = student.encode_image(preprocess_for(student, images[idx]))
        txt = encode_text(student, tok[b["cap"]])
        c = clip_loss(img, txt, student.logit_scale.exp())
        out["clip"] = c.detach()
        out["loss"] = lam * c + (1 - lam) * rl.loss if use_regions else c
        return out

    log_every = max(1, min(50, steps // 4 or 1))
    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, seed=seed,
                      precision=precision, progress=progress, log_every=log_every, desc="ravl" if use_regions else "ft",
                      checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                      checkpoint_every=checkpoint_every)
    student.train()
    params = [{"params": [p for p in student.parameters() if p.requires_grad], "name": "all"}]
    state = train_fit(student, loss_fn, batches, cfg, params=params)
    student.eval()
    classifier = zero_shot_classifier(student, classnames, templates)
    hparams: dict[str, Any] = dict(method="ravl", steps=steps, batch_size=bs, lam=lam, temperature=temperature, lr=lr,
                                   weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, seed=seed,
                                   precision=precision, n_train=n, region_method=region_method,
                                   optimizer="AdamW (decay on all parameters)", schedule="linear warm-up + cosine")
    if split is not None:
        hparams["split"] = split.summary()
    train_log = {"losses": list(state.losses), "history": [dict(h) for h in state.history],
                 "elapsed_s": state.elapsed_s, "resumed_from": state.resumed_from,
                 "metrics": {**{k: float(v) for k, v in state.last_metrics.items()},
                             "loss": state.losses[-1] if state.losses else math.nan}}
    return RobustResult(method="ravl", model=student, classifier=classifier, zero_shot=zero_shot,
                        classnames=classnames, templates=templates, hparams=hparams, train_log=train_log)


def _group_table(pred: torch.Tensor, y: torch.Tensor, present: torch.Tensor, n_cls: int) -> dict[str, Any]:
    correct = (pred == y).double()
    g = y * 2 + present.long()
    n = torch.bincount(g, minlength=2 * n_cls).double()
    c = torch.bincount(g, weights=correct, minlength=2 * n_cls)
    acc = torch.where(n > 0, c / n.clamp_min(1), torch.full_like(n, math.nan))
    groups = {f"{cls}|{'with' if p else 'without'}": (float(acc[cls * 2 + p]), int(n[cls * 2 + p]))
              for cls in range(n_cls) for p in (0, 1) if n[cls * 2 + p] > 0}
    valid = acc[n > 0]
    return {"accuracy": float(correct.mean()) if correct.numel() else math.nan,
            "worst_group": float(valid.min()) if valid.numel() else math.nan, "groups": groups}


@torch.no_grad()
def evaluate_groups(classifier: nn.Module, data: Any, *, region_method: str = "auto", batch_size: int = 256
                    ) -> dict[str, Any]:
    """Image and region accuracy, overall and worst-group (groups: class x ``data.has_spurious``), of an
    :class:`~vlmfast.tuning.robust.ImageClassifier` on a spurious-MNIST-like set (``region_labels`` marks the digit
    region ``vlmfast.data.REGION_DIGIT``; the region is classified by the same head on its region embedding)."""
    from vlmfast.data import REGION_DIGIT
    from vlmfast.models.regions import region_features

    y = torch.as_tensor(data.labels).long()
    present = torch.as_tensor(data.has_spurious).bool()
    n_cls = int(classifier.head.weight.shape[0])
    logits, _ = predict(classifier, data, batch_size=batch_size)
    out = {"image": _group_table(logits.argmax(1), y, present, n_cls)}
    rl = torch.as_tensor(getattr(data, "region_labels", None)) if hasattr(data, "region_labels") else None
    if rl is not None:
        q = (rl == REGION_DIGIT).float().argmax(1)
        boxes = torch.as_tensor(data.region_boxes).float()[torch.arange(y.shape[0]), q][:, None]  # (N, 1, 4)
        was = classifier.training
        classifier.eval()
        dev = next(classifier.parameters()).device
        feats = []
        for s in range(0, y.shape[0], batch_size):
            f = region_features(classifier, data.images[s:s + batch_size], boxes[s:s + batch_size],
                                method=region_method)[:, 0]
            feats.append(f.to(dev))
        classifier.train(was)
        rlog = classifier.head(torch.cat(feats).float()).cpu()
        out["region"] = _group_table(rlog.argmax(1), y, present, n_cls)
    return out


__all__ = ["DEFAULTS", "RegionSplit", "evaluate_groups", "fit", "split_regions"]
