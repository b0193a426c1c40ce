"""The fleet audit: every model of a manifest x every audit x every split, into an :class:`~vlmfast.fleet.AuditStore`,
computing only what the store does not already hold.

**Units of work.** A unit is ``(model, audit, split)``, keyed in the store by ``(model_key, audit, data_fp,
settings_key)`` (:mod:`vlmfast.fleet.store`): the SHA-256 identity of the weights, the fingerprint of the split's
data, and the hash of the audit's settings. Each unit is committed in one transaction with its ``done`` marker, so
a run killed at any point and started again recomputes only the units that were not committed, and its final
store equals an uninterrupted run's. What is re-audited: a new or retrained model (new key), a new or changed
split, changed settings; ``force=True`` recomputes everything. Runtime options that do not change the numbers
(``batch_size``, progress bars) are not part of the key; the device is not either (CPU and CUDA agree to rounding).

**Per model** (in manifest order): hash the checkpoint file(s) (streamed SHA-256; a ``base`` entry is loaded
first, from ``pretrain_base``'s cache, and keyed by its weights), look up every unit, load the model only if one is
left, compute and commit those units. While a model computes, the next one's checkpoint is loaded in a background
thread (``prefetch``). A model that fails to hash or load (missing or corrupt file, shape mismatch) is recorded in
the store's ``failures`` with audit ``"load"``; an audit that raises is recorded under its name; the run goes on
either way. Only ``Exception``\\ s are caught: ``KeyboardInterrupt`` and other ``BaseException``\\ s stop the run
(what was committed stays).

**Audits** (:data:`AUDITS`: name -> :class:`Audit`; each function ``fn(model_or_classifier, split, settings,
options) -> [(split, metric, value)]``):

* ``calibration`` — logits of the split (a classifier's head; a CLIP model's zero-shot logits at its own logit
  scale, prompts ``settings["templates"]`` averaged per class: :func:`vlmfast.tuning.robust.zero_shot_classifier`;
  a prompt learner's logits — its learned context with every class name of the split, on its backbone's image
  features, as :func:`vlmfast.tuning.evaluate_base_to_new` computes them, all classes as one closed set)
  into :func:`vlmfast.metrics.calibration`: ``accuracy``, ``confidence``, ``ece``, ``ace``, ``mce``,
  ``mce_weighted``, ``rmsce``, ``nll``, ``brier``, ``ece_per_batch`` (with ``per_batch``), ``n``; on a split with
  a planted feature (``has_spurious``: the spurious-MNIST composites) also ``worst_group_accuracy`` (groups: class
  x square present); for a prompt learner also the base-to-new protocol (:data:`BASE_NEW_METRICS`: base = the
  classes it was trained on, new = the split's others, each half a closed set; ECE / ACE at ``n_bins``);
* ``rationality`` — :func:`vlmfast.audit.heatmaps` of the ground-truth class scored by
  :func:`vlmfast.metrics.rationality` against the digit masks (``mask="box"``: ``masks_from_boxes`` of the tight
  digit boxes; ``"stroke"``: the stroke pixels): ``accuracy``, ``pt``, ``ir``, ``mean_rma_correct``, ``RR``,
  ``RW``, ``WR``, ``WW``, ``n_constant``, ``n`` (as ``vlmfast audit rationality``);
* ``spurious`` — :func:`vlmfast.audit.spurious.discover` of the CLIP model (a classifier entry's fine-tuned CLIP) on
  the spurious-MNIST test split only (the only split whose red squares are independent of the class):
  ``k``, ``silhouette``, ``found``, ``n_clusters``, ``top_gap``, ``top_influence``, ``top_square_fraction``,
  ``precision_at_10`` against the red-square quadrants (NaN where nothing was found), as ``vlmfast audit
  spurious``.

Each audit names the entry kinds it applies to (:attr:`Audit.kinds`): ``prompt`` entries (a learned text context on
a frozen backbone) are audited for calibration only — their image tower is the backbone's.

**Splits** are built once per run (:func:`build_splits`; names ``"id"`` = ``spurious_mnist("test")``,
``"sklearn-digits"``, ``"KIND-SEVERITY"`` as :func:`vlmfast.tuning.robust.digit_splits`, ``"folder:CSV"`` = a
user's image folder listed in ``CSV`` (paths relative to its folder; :func:`vlmfast.data.image_folder`) **streamed**),
or passed ready as a mapping name -> dataset (in memory or an :class:`vlmfast.data.ImageFolderStream`). A streamed
split is never decoded whole: its fingerprint comes from the CSV and the files, the calibration audit reads it one
batch at a time (a 50,000-image folder needs the memory of one batch), and the audits that need every image at
once (rationality, spurious) do not apply to it.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from vlmfast.fleet.manifest import (LoadedModel, ManifestEntry, load_backbone, load_entry, load_manifest,
                                    model_key)
from vlmfast.fleet.store import AUDIT_TABLES, AuditStore, data_fingerprint, settings_key

__all__ = ["AUDITS", "DEFAULT_SPLITS", "Audit", "AuditOutput", "FleetSummary", "ModelReport", "RunOptions", "Split",
           "audit_fleet", "build_splits", "resolve_settings"]

#: The default evaluation splits: the in-distribution test composites and a real domain shift.
DEFAULT_SPLITS = ("id", "sklearn-digits")

CALIBRATION_METRICS = ("accuracy", "confidence", "ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier")


@dataclass
class Split:
    """An evaluation split: its ``name`` (the rows' ``split``), the dataset, its :func:`data_fingerprint` and a
    JSON ``info`` recorded with it (source, n, seed)."""

    name: str
    data: Any
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOptions:
    """Runtime options of the audit functions that do not change their numbers (not part of any key)."""

    batch_size: int = 64
    progress: bool = False
    artifacts: bool = True  # what the report draws: reliability bins, a few heatmaps, the top cluster's regions


@dataclass
class AuditOutput:
    """What an audit function may return instead of bare rows: the ``rows`` and the unit's ``artifacts``
    ``[(split, name, kind, bytes)]`` (:meth:`vlmfast.fleet.AuditStore.write`)."""

    rows: list[tuple[str, str, Any]]
    artifacts: list[tuple[str, str, str, bytes]] = field(default_factory=list)


def split_output(out: Any) -> tuple[list[tuple[str, str, Any]], list[tuple[str, str, str, bytes]]]:
    """``(rows, artifacts)`` of an audit function's return value (an :class:`AuditOutput` or an iterable of rows)."""
    if isinstance(out, AuditOutput):
        return [tuple(r) for r in out.rows], list(out.artifacts)
    return [tuple(r) for r in out], []


#: How many images a unit keeps for the report: heatmap overlays (rationality), regions of the top cluster (spurious).
N_ARTIFACT_IMAGES = 8
N_GALLERY_REGIONS = 10


def _json_bytes(obj: Any) -> bytes:
    import json

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps({k: clean(v) for k, v in obj.items()}, allow_nan=False, sort_keys=True).encode()


def _tensor_bytes(tensors: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def reliability_artifact(split: str, r: Any, m: int | None = None) -> tuple[str, str, str, bytes]:
    """The ``reliability`` artifact of a :class:`~vlmfast.metrics.CalibrationResult` (model ``m`` of several): its
    per-bin counts, mean confidence and accuracy (NaN for empty bins as null)."""
    pick = (lambda t: t) if m is None else (lambda t: t[m])
    return (split, "reliability", "json", _json_bytes({
        "n_bins": int(r.n_bins), "binning": r.binning, "convention": r.convention,
        "bin_count": [float(x) for x in pick(r.bin_count).double().tolist()],
        "bin_confidence": [float(x) for x in pick(r.bin_confidence).double().tolist()],
        "bin_accuracy": [float(x) for x in pick(r.bin_accuracy).double().tolist()]}))


@dataclass(frozen=True)
class Audit:
    """A registered audit: ``fn(model_or_classifier, split, settings, options) -> [(split, metric, value)]``;
    ``target``: ``"audited"`` (the classifier of a classifier entry, else the CLIP model) or ``"clip"`` (always
    the CLIP model); ``defaults``: its settings (every key it accepts); ``applies(split) -> bool``: the splits it
    runs on; ``version``: part of the settings key (bump it when the audit's numbers change); ``kinds``: the
    manifest entry kinds it audits (the others are left out of its units)."""

    name: str
    fn: Callable[..., list[tuple[str, str, Any]]]
    defaults: Mapping[str, Any]
    target: str = "audited"
    applies: Callable[[Split], bool] = lambda split: True
    version: int = 1
    kinds: tuple[str, ...] = ("clip", "classifier", "base")


# ------------------------------------------------------------------------------------------------- the audits


def _num(v: Any) -> float:
    if v is None:
        return float("nan")
    return float(v.item() if hasattr(v, "item") else v)


def calibration_audit(target: Any, split: Split, settings: Mapping[str, Any],
                      options: RunOptions | None = None) -> list[tuple[str, str, float]]:
    """Calibration metrics of ``target`` (a CLIP model, an ``ImageClassifier`` or a ``PromptLearner``) on
    ``split`` (module docs)."""
    import torch

    from vlmfast.metrics import calibration
    from vlmfast.tuning.prompt import PromptLearner

    opts = options or RunOptions()
    data = split.data
    with _precision(target, settings.get("precision", "fp32")):
        logits, feats = _calibration_logits(target, data, settings, opts)
    labels = torch.as_tensor(data.labels).long()
    r = calibration(logits, labels, n_bins=int(settings["n_bins"]), per_batch=settings["per_batch"])
    rows = [(split.name, m, _num(getattr(r, m))) for m in CALIBRATION_METRICS]
    if settings["per_batch"] is not None:
        rows.append((split.name, "ece_per_batch", _num(r.ece_per_batch)))
    rows.append((split.name, "n", float(labels.shape[0])))
    if getattr(data, "has_spurious", None) is not None:
        rows.append((split.name, "worst_group_accuracy", worst_group_accuracy(logits, labels, data.has_spurious)))
    if isinstance(target, PromptLearner) and not target.csc:
        rows.extend(_base_to_new_rows(target, data, feats, split.name, int(settings["n_bins"])))
    return AuditOutput(rows, [reliability_artifact(split.name, r)] if opts.artifacts else [])


def _precision(target: Any, precision: str) -> Any:
    """bf16 autocast on the target's device for ``"bf16"`` (the forward passes; metrics stay in float32)."""
    import contextlib

    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    dev = next(target.parameters()).device
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def _calibration_logits(target: Any, data: Any, settings: Mapping[str, Any], opts: RunOptions) -> tuple[Any, Any]:
    """(float32 CPU logits, image features or None) of ``target`` on ``data``."""
    import torch

    from vlmfast.tuning.prompt import PromptLearner
    from vlmfast.tuning.robust import ImageClassifier, predict, zero_shot_classifier

    feats = None
    if isinstance(target, PromptLearner):
        from vlmfast.models.text import encode_images

        feats = encode_images(target.model, data, batch_size=max(opts.batch_size, 1)).float()  # streams too
        with torch.no_grad():
            logits = target.logits(feats, list(data.classnames)).float().cpu()
    else:
        clf = target if isinstance(target, ImageClassifier) else zero_shot_classifier(
            target, list(data.classnames), list(settings["templates"]))
        logits, _ = predict(clf, data, batch_size=max(opts.batch_size, 1))  # streams batch by batch
    return logits.float().cpu(), feats


def in_memory(data: Any) -> bool:
    """Whether a split holds its images as one tensor (the built-in sets, ``image_folder``) rather than streaming
    them (:class:`vlmfast.data.ImageFolderStream`: decoded batch by batch, never all in memory)."""
    import torch

    return isinstance(getattr(data, "images", None), torch.Tensor)


def worst_group_accuracy(logits: Any, labels: Any, has_spurious: Any) -> float:
    """The lowest accuracy over the groups class x spurious feature present (the groups with a sample), as RaVL's
    evaluation computes it (:func:`vlmfast.tuning.region.evaluate_groups`)."""
    import torch

    from vlmfast.tuning.region import _group_table

    y = torch.as_tensor(labels).long().flatten()
    present = torch.as_tensor(has_spurious).bool().flatten()
    return _group_table(logits.argmax(-1).cpu(), y, present, int(logits.shape[-1]))["worst_group"]


#: The base-to-new metrics of a prompt learner's calibration audit (the CoOp protocol: base classes = the ones it
#: was trained on, new = the others of the split, each half a closed set).
BASE_NEW_METRICS = ("base_accuracy", "new_accuracy", "H", "base_ece", "new_ece", "base_ace", "new_ace")


def base_new_halves(names: Sequence[str], trained: Sequence[str], labels: Any
                    ) -> list[tuple[str, list[str], Any, Any]]:
    """The base-to-new protocol's two closed sets of a split with class ``names`` for a learner trained on
    ``trained``: ``[(half, its class names, sample mask, labels re-indexed within the half)]`` for ``"base"`` and
    ``"new"``; ``[]`` when either half has no class or no sample."""
    import torch

    labels = torch.as_tensor(labels).long().flatten()
    t = set(trained)
    halves = (("base", [i for i, c in enumerate(names) if c in t]), ("new", [i for i, c in enumerate(names)
                                                                           if c not in t]))
    out = []
    for half, ids in halves:
        if not ids:
            return []
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[torch.tensor(ids)] = torch.arange(len(ids))
        y = remap[labels]
        mask = y >= 0
        if not bool(mask.any()):
            return []
        out.append((half, [names[i] for i in ids], mask, y[mask]))
    return out


def _harmonic(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n > 0 else 0.0


def _base_to_new_rows(learner: Any, data: Any, feats: Any, split: str, n_bins: int) -> list[tuple[str, str, float]]:
    """Base / new accuracy and ECE / ACE of ``learner`` on ``data`` (base = its trained class names; nothing when
    the split has no class of either half)."""
    import torch

    from vlmfast.metrics import calibration

    halves = base_new_halves(list(data.classnames), learner.classnames, torch.as_tensor(data.labels))
    if not halves:
        return []
    out: dict[str, float] = {}
    for part, names, mask, y in halves:
        with torch.no_grad():
            logits = learner.logits(feats[mask.to(feats.device)], names).float().cpu()
        cal = calibration(logits, y, n_bins=n_bins)
        out[f"{part}_accuracy"], out[f"{part}_ece"], out[f"{part}_ace"] = (
            _num(cal.accuracy), _num(cal.ece), _num(cal.ace))
    out["H"] = _harmonic(out["base_accuracy"], out["new_accuracy"])
    return [(split, m, out[m]) for m in BASE_NEW_METRICS]


def digit_masks(data: Any, kind: str):
    """Ground-truth masks of the digits: ``"box"`` (the tight digit box, filled) or ``"stroke"`` (its pixels)."""
    import torch

    from vlmfast.metrics import masks_from_boxes

    if kind == "stroke":
        return torch.as_tensor(data.digit_masks)
    return masks_from_boxes(torch.as_tensor(data.boxes).float(), tuple(data.images.shape[-2:]))


def rationality_audit(target: Any, split: Split, settings: Mapping[str, Any],
                      options: RunOptions | None = None) -> list[tuple[str, str, float]]:
    """PT / IR of ``target``'s heatmaps on ``split`` against the digit masks (module docs)."""
    from vlmfast.audit import heatmaps
    from vlmfast.metrics import rationality

    opts = options or RunOptions()
    data = split.data
    blocks = None if settings["blocks"] == "auto" else settings["blocks"]
    h = heatmaps(target, data.images, data.labels, classnames=list(data.classnames), blocks=blocks,
                 batch_size=max(opts.batch_size, 1), progress=opts.progress, desc=split.name)
    masks = digit_masks(data, settings["mask"]).to(h.maps.device)
    r = rationality(h.maps, masks, h.correct, threshold=float(settings["threshold"]))
    d = r.as_dict()
    out = [(split.name, "accuracy", float(h.correct.float().mean()))]
    for m in ("pt", "ir", "mean_rma_correct", "RR", "RW", "WR", "WW", "n_constant", "n"):
        out.append((split.name, m, _num(d[m])))
    arts = []
    if opts.artifacts:
        import torch

        k = min(N_ARTIFACT_IMAGES, int(h.maps.shape[0]))
        imgs = torch.as_tensor(data.images[:k])
        arts.append((split.name, "heatmaps", "safetensors", _tensor_bytes({
            "images": imgs if imgs.dtype == torch.uint8 else (imgs.float().clamp(0, 1) * 255).round().to(torch.uint8),
            "maps": h.maps[:k].float().clamp(0, 1).half(), "masks": masks[:k].bool().to(torch.uint8),
            "labels": torch.as_tensor(data.labels[:k]).long(), "correct": h.correct[:k].to(torch.uint8)})))
    return AuditOutput(out, arts)


def spurious_audit(target: Any, split: Split, settings: Mapping[str, Any],
                   options: RunOptions | None = None) -> list[tuple[str, str, float]]:
    """RaVL discovery of ``target`` (a CLIP model) on the spurious-MNIST test ``split`` (module docs)."""
    import torch

    from vlmfast.audit.spurious import discover, precision_at_k
    from vlmfast.data import REGION_SPURIOUS

    opts = options or RunOptions()
    data = split.data
    ks = settings["ks"]
    res = discover(target, data, list(data.classnames), ks=None if ks is None else range(int(ks[0]), int(ks[1])),
                   clip_distances=bool(settings["clip_distances"]), threshold=float(settings["threshold"]),
                   seed=int(settings["seed"]), method=settings["method"], temperature=float(settings["temperature"]),
                   batch_size=max(opts.batch_size, 1), progress=opts.progress)
    truth = (torch.as_tensor(data.region_labels) == REGION_SPURIOUS).reshape(-1).numpy()
    top = res.top
    nan = float("nan")
    arts = []
    if opts.artifacts and top is not None and top.regions:
        n_reg = int(torch.as_tensor(data.region_labels).shape[1])
        ids = torch.as_tensor(list(top.regions[:N_GALLERY_REGIONS])).long()
        img, q = ids // n_reg, ids % n_reg
        imgs = torch.as_tensor(data.images)[img]
        arts.append((split.name, "top_cluster", "safetensors", _tensor_bytes({
            "images": imgs if imgs.dtype == torch.uint8 else (imgs.float().clamp(0, 1) * 255).round().to(torch.uint8),
            "boxes": torch.as_tensor(data.region_boxes).float()[img, q],
            "is_spurious": torch.as_tensor(truth[ids.numpy()]).to(torch.uint8),
            "attribute": torch.tensor([-1 if top.attribute is None else int(top.attribute)])})))
    return AuditOutput([(split.name, m, _num(v)) for m, v in (
        ("k", res.k), ("silhouette", res.silhouette), ("found", float(res.found)), ("n_clusters", len(res.clusters)),
        ("top_gap", top.gap if top else nan), ("top_influence", top.influence if top else nan),
        ("top_square_fraction", float(truth[top.regions].mean()) if top and top.regions else nan),
        ("precision_at_10", precision_at_k(res, truth, 10) if top else nan))], arts)


def _spurious_split(split: Split) -> bool:
    return getattr(split.data, "split", None) == "test" and getattr(split.data, "region_labels", None) is not None


def _rationality_split(split: Split) -> bool:
    """Heatmaps need the images in memory and the digits' boxes (the built-in composites and shifts)."""
    return in_memory(split.data) and getattr(split.data, "boxes", None) is not None


def _default_templates() -> list[str]:
    from vlmfast.data import CAPTION_TEMPLATES

    return list(CAPTION_TEMPLATES)


#: name -> :class:`Audit`. Each name has its results table in the store (:data:`vlmfast.fleet.store.AUDIT_TABLES`).
AUDITS: dict[str, Audit] = {
    "calibration": Audit("calibration", calibration_audit,
                         # templates None: CAPTION_TEMPLATES; precision "auto": bf16 on CUDA, fp32 elsewhere
                         {"n_bins": 15, "per_batch": 512, "templates": None, "precision": "auto"},
                         version=2, kinds=("clip", "classifier", "base", "prompt")),
    "rationality": Audit("rationality", rationality_audit, {"threshold": 0.5, "blocks": "auto", "mask": "box"},
                         applies=_rationality_split),
    "spurious": Audit("spurious", spurious_audit,
                      {"ks": None, "clip_distances": True, "threshold": 0.25, "method": "auto", "seed": 0,
                       "temperature": 0.07}, target="clip", applies=_spurious_split),
}


def resolve_settings(audit: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full settings of ``audit``: its defaults updated with ``overrides`` (ValueError naming an unknown key
    or a bad value), plus ``version``. This dict is what the settings key hashes."""
    if audit not in AUDITS:
        raise ValueError(f"audits: expected names from {tuple(AUDITS)}, got {audit!r}")
    spec = AUDITS[audit]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        raise ValueError(f"settings[{audit!r}]: unknown key {unknown[0]!r}; expected some of {sorted(spec.defaults)}")
    s = {**spec.defaults, **overrides}
    if audit == "calibration":
        if s["templates"] is None:
            s["templates"] = _default_templates()
        if isinstance(s["templates"], str) or not all(isinstance(t, str) and "{}" in t for t in s["templates"]) \
                or not s["templates"]:
            raise ValueError(f"settings['calibration']['templates']: expected a non-empty list of str with '{{}}', "
                             f"got {s['templates']!r}")
        s["templates"] = list(s["templates"])
        if isinstance(s["n_bins"], bool) or not isinstance(s["n_bins"], int) or s["n_bins"] < 1:
            raise ValueError(f"settings['calibration']['n_bins']: expected an int >= 1, got {s['n_bins']!r}")
        if s["precision"] not in ("auto", "fp32", "bf16"):
            raise ValueError(f"settings['calibration']['precision']: expected auto, fp32 or bf16, got "
                             f"{s['precision']!r}")
    elif audit == "rationality":
        if s["blocks"] not in ("auto", "last", "all"):
            raise ValueError(f"settings['rationality']['blocks']: expected auto, last or all, got {s['blocks']!r}")
        if s["mask"] not in ("box", "stroke"):
            raise ValueError(f"settings['rationality']['mask']: expected box or stroke, got {s['mask']!r}")
    elif audit == "spurious" and s["ks"] is not None:
        ks = s["ks"]
        if isinstance(ks, range):
            ks = [ks.start, ks.stop]
        if not (isinstance(ks, (list, tuple)) and len(ks) == 2 and all(isinstance(k, int) for k in ks)
                and 2 <= ks[0] < ks[1]):
            raise ValueError(f"settings['spurious']['ks']: expected [A, B] with 2 <= A < B, got {s['ks']!r}")
        s["ks"] = list(ks)
    for key in ("threshold",):
        if key in s and not (isinstance(s[key], (int, float)) and 0.0 <= s[key] <= 1.0):
            raise ValueError(f"settings[{audit!r}][{key!r}]: expected a number in [0, 1], got {s[key]!r}")
    s["version"] = spec.version
    return s


# ------------------------------------------------------------------------------------------------- splits


def build_split(name: str, n: int, seed: int, *, what: str = "splits", id_name: str = "id", folders: bool = True):
    """One built-in evaluation split by name: ``id_name`` (``spurious_mnist("test")``), ``"sklearn-digits"``,
    ``"KIND-SEVERITY"`` (a corrupted test split) or, with ``folders``, ``"folder:CSV"`` (a streamed image folder);
    ValueError naming ``what`` for anything else."""
    from vlmfast.data import CORRUPTIONS, corrupted_test, sklearn_digits, spurious_mnist

    if name == id_name:
        return spurious_mnist("test", n=n, seed=seed)
    if name == "sklearn-digits":
        return sklearn_digits(n=n, seed=seed)
    m = re.fullmatch(r"([a-z]+)-([1-5])", name)
    if m and m.group(1) in CORRUPTIONS:
        return corrupted_test(m.group(1), int(m.group(2)), n=n, seed=seed)
    if folders and name.startswith("folder:") and len(name) > len("folder:"):
        from pathlib import Path

        from vlmfast.data import image_folder

        csv = Path(name[len("folder:"):])
        return image_folder(csv.parent, csv, split=name, stream=True)
    raise ValueError(f"{what}: expected {id_name}, sklearn-digits or KIND-SEVERITY with KIND in {CORRUPTIONS} and "
                     f"SEVERITY in 1..5{', or folder:CSV' if folders else ''}, got {name!r}")


def build_splits(splits: Sequence[str] | Mapping[str, Any] = DEFAULT_SPLITS, *, n: int = 1000,
                 seed: int = 0) -> dict[str, Split]:
    """The evaluation splits, each built once and fingerprinted: names (module docs; ``n`` images each, data seed
    ``seed``) or a mapping name -> dataset (used as given)."""
    if isinstance(splits, str):
        raise TypeError(f"splits: expected a sequence of names or a mapping, got the str {splits!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    out: dict[str, Split] = {}
    if isinstance(splits, Mapping):
        for name, data in splits.items():
            if isinstance(data, Split):
                out[str(name)] = data
                continue
            out[str(name)] = Split(str(name), data, data_fingerprint(data, str(name)),
                                   {"source": str(getattr(data, "split", "")), "n": len(data)})
    else:
        for name in splits:
            if not isinstance(name, str) or not name:
                raise ValueError(f"splits: expected non-empty split names, got {name!r}")
            if name in out:
                raise ValueError(f"splits: {name!r} given twice")
            data = build_split(name, n, seed)
            info = {"source": name, "n": len(data)} if name.startswith("folder:") else {
                "source": name, "n": len(data), "seed": seed}
            out[name] = Split(name, data, data_fingerprint(data, name), info)
    if not out:
        raise ValueError("splits: expected at least one split, got none")
    return out


# ------------------------------------------------------------------------------------------------- prompt heads


def _groupable(entry: ManifestEntry) -> bool:
    """A prompt entry whose class features do not depend on the image (not CoCoOp): it can join a head group."""
    return entry.kind == "prompt" and not str(entry.method or "").startswith("cocoop")


def _backbone_id(entry: ManifestEntry) -> tuple[str, ...]:
    if entry.base_backbone:
        return ("base", str(entry.config), str(entry.preset))
    return ("file", str(entry.backbone_resolved))


def prompt_groups(entries: Sequence[ManifestEntry]) -> dict[tuple[str, ...], list[int]]:
    """Backbone -> the indices of the groupable prompt entries on it, for backbones with at least two (the others
    run one by one)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, e in enumerate(entries):
        if _groupable(e):
            groups.setdefault(_backbone_id(e), []).append(i)
    return {k: v for k, v in groups.items() if len(v) > 1}


def _worst_group_many(xn: Any, wn: Any, labels: Any, present: Any, chunk_elems: int = 1 << 22) -> Any:
    """(M,) worst-group accuracy (groups class x feature present) of M heads ``wn`` (M, C, D) on ``xn`` (N, D),
    both normalized; the (M, N, C) logits exist one block of heads at a time."""
    import torch

    M, C, _ = wn.shape
    N = xn.shape[0]
    g = labels * 2 + present.long()
    n = torch.bincount(g, minlength=2 * C).double()
    valid = n > 0
    out = torch.empty(M, dtype=torch.float64)
    step = max(1, chunk_elems // max(1, N * C))
    for h0 in range(0, M, step):
        h1 = min(M, h0 + step)
        pred = torch.matmul(xn, wn[h0:h1].transpose(1, 2)).argmax(-1)  # (h, N); a positive scale moves no argmax
        correct = (pred == labels).double()
        c = torch.zeros(h1 - h0, 2 * C, dtype=torch.float64).index_add_(1, g, correct)
        out[h0:h1] = (c[:, valid] / n[valid]).min(1).values
    return out


def grouped_calibration_rows(feats: Any, heads: Any, scale: Any, data: Any, trained: Sequence[Sequence[str]],
                             settings: Mapping[str, Any], split: str
                             ) -> tuple[list[list[tuple[str, str, float]]], Any]:
    """The calibration audit's rows for M prompt heads on one backbone at once: ``feats`` (N, D) the split's image
    features, ``heads`` (M, C, D) each learner's class text features for the split's class names, ``scale`` the
    backbone's logit multiplier, ``trained[m]`` the class names learner m was trained on (its base classes). The
    logits never exist for all heads at once (:func:`vlmfast.metrics.calibration_from_features`); the rows equal
    :func:`calibration_audit`'s for each learner, to float32 rounding of the GEMM. Returns ``(rows per head, the
    CalibrationResult of all heads)`` (its bins are the heads' reliability artifacts)."""
    import torch

    from vlmfast.metrics import calibration_from_features

    M = heads.shape[0]
    n_bins, per_batch = int(settings["n_bins"]), settings["per_batch"]
    labels = torch.as_tensor(data.labels).long().flatten()
    feats = feats.float().cpu()
    heads = heads.float().cpu()
    scale_m = torch.as_tensor(scale, dtype=torch.float32).reshape(1).expand(M).contiguous()
    r = calibration_from_features(feats, heads, scale_m, labels, n_bins=n_bins, per_batch=per_batch)
    rows: list[list[tuple[str, str, float]]] = [[] for _ in range(M)]
    for m in range(M):
        rows[m] = [(split, k, _num(getattr(r, k)[m])) for k in CALIBRATION_METRICS]
        if per_batch is not None:
            rows[m].append((split, "ece_per_batch", _num(r.ece_per_batch[m])))
        rows[m].append((split, "n", float(labels.shape[0])))
    if getattr(data, "has_spurious", None) is not None:
        xn = torch.nn.functional.normalize(feats, dim=-1)
        wn = torch.nn.functional.normalize(heads, dim=-1)
        wg = _worst_group_many(xn, wn, labels, torch.as_tensor(data.has_spurious).bool().flatten())
        for m in range(M):
            rows[m].append((split, "worst_group_accuracy", float(wg[m])))
    names = list(data.classnames)
    by_trained: dict[tuple[str, ...], list[int]] = {}
    for m, t in enumerate(trained):
        by_trained.setdefault(tuple(t), []).append(m)
    for t, members in by_trained.items():
        part: dict[str, Any] = {}
        for half, half_names, mask, y in base_new_halves(names, t, labels):
            ids = [names.index(c) for c in half_names]
            part[half] = calibration_from_features(feats[mask], heads[members][:, ids], scale_m[:len(members)], y,
                                                   n_bins=n_bins)
        if not part:
            continue
        for j, m in enumerate(members):
            v = {f"{h}_{k}": _num(getattr(part[h], k)[j]) for h in ("base", "new") for k in ("accuracy", "ece",
                                                                                             "ace")}
            v["H"] = _harmonic(v["base_accuracy"], v["new_accuracy"])
            rows[m].extend((split, k, v[k]) for k in BASE_NEW_METRICS)
    return rows, r


# ------------------------------------------------------------------------------------------------- the runner


@dataclass
class ModelReport:
    """One model's outcome: ``status`` ``"done"`` (its missing units computed), ``"skipped"`` (nothing missing) or
    ``"failed"`` (load or an audit failed; the units that succeeded are committed). ``computed`` lists the
    ``(audit, split)`` computed now, ``reused`` counts those found in the store."""

    name: str
    status: str
    model_key: str | None = None
    computed: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        if self.status == "skipped":
            if not self.reused:
                return f"{self.name}: skipped (no audit asked for applies to it)"
            return f"{self.name}: skipped ({self.reused} results already stored)"
        what = ", ".join(f"{a}/{s}" for a, s in self.computed) or "nothing"
        text = f"{self.name}: {self.status} ({what} in {self.seconds:.1f} s" + (
            f"; {self.reused} reused)" if self.reused else ")")
        for audit, err in self.errors:
            text += f"; {audit} failed: {err}"
        return text


@dataclass
class FleetSummary:
    """What :func:`audit_fleet` did: model counts ``done`` / ``skipped``, ``failed`` ``[(name, audit, error)]``
    (``audit`` ``"load"`` when the model did not hash or load), unit counts ``computed`` / ``reused``, the
    per-model ``reports``, ``notes`` (e.g. an audit that applies to none of the splits) and the wall time."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    reports: list[ModelReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return len({name for name, _, _ in self.failed})

    def line(self) -> str:
        """The summary line: models done / skipped / failed (with reasons), results computed / reused, time."""
        n = self.done + self.skipped + self.n_failed
        text = (f"{n} model{'s' if n != 1 else ''}: {self.done} done, {self.skipped} skipped, {self.n_failed} failed"
                f"; {self.computed} results computed, {self.reused} reused; {self.seconds:.1f} s")
        if self.failed:
            text += "; failures: " + "; ".join(f"{name} ({audit}): {err}" for name, audit, err in self.failed)
        return text


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _prepare(entry: ManifestEntry, device: Any, bars: bool) -> tuple[str, dict, LoadedModel | None]:
    """``(model_key, file hashes, loaded model or None)``: a file entry is hashed without loading; a ``base`` entry
    (or a prompt entry on the base) is loaded (``pretrain_base``'s cache) and keyed by its weights."""
    if entry.base_backbone:
        loaded = load_entry(entry, device=device, progress=None if bars else False)
        key, parts = model_key(entry, loaded.clip)
        return key, parts, loaded
    key, parts = model_key(entry)
    return key, parts, None


def model_card(entry: ManifestEntry, parts: Mapping[str, str]) -> dict[str, Any]:
    """The card a model is recorded with in the store (``models.card``): kind, method, seed, tags, meta, file
    hashes."""
    return {"kind": entry.kind, "method": entry.method, "seed": entry.seed, "tags": entry.tags, "meta": entry.meta,
            "files": dict(parts)}


def _report_fn(progress: Any) -> Callable[[ModelReport], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda r: print(r.line(), file=sys.stderr, flush=True)
    return lambda r: None


def _on_cuda(device: Any) -> bool:
    import torch

    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def check_audits(audits: Sequence[str] | str, settings: Mapping[str, Mapping[str, Any]] | None, device: Any = None
                 ) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, str]]:
    """``(audit names, resolved settings per audit, settings key per audit)`` of the ``audits`` argument (a list
    or a comma-separated str) and the ``settings`` overrides; ValueError for unknown names. The calibration
    audit's ``precision="auto"`` is resolved here — ``"bf16"`` when the models run on CUDA (``device``; None:
    CUDA when available), else ``"fp32"`` — so that bf16 and fp32 results have different keys."""
    if isinstance(audits, str):
        audits = [a.strip() for a in audits.split(",") if a.strip()]
    audits = list(dict.fromkeys(audits))
    if not audits:
        raise ValueError("audits: expected at least one audit name, got none")
    for a in audits:
        if a not in AUDITS or a not in AUDIT_TABLES:
            raise ValueError(f"audits: expected names from {tuple(AUDITS)}, got {a!r}")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(AUDITS))
    if unknown:
        raise ValueError(f"settings: unknown audit {unknown[0]!r}; expected some of {tuple(AUDITS)}")
    resolved = {a: resolve_settings(a, settings.get(a)) for a in audits}
    if resolved.get("calibration", {}).get("precision") == "auto":
        resolved["calibration"]["precision"] = "bf16" if _on_cuda(device) else "fp32"
    return audits, resolved, {a: settings_key(resolved[a]) for a in audits}


def audit_fleet(
    manifest: str | os.PathLike | Iterable[ManifestEntry],
    audits: Sequence[str] = ("calibration",),
    db: str | os.PathLike | AuditStore = "audit.sqlite",
    splits: Sequence[str] | Mapping[str, Any] = DEFAULT_SPLITS,
    *,
    n: int = 1000,
    seed: int = 0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    progress: bool | Callable[[ModelReport], None] | None = None,
    bars: bool = False,
    device: Any = None,
    batch_size: int = 64,
    prefetch: bool = True,
    group_prompts: bool = True,
    artifacts: bool = True,
) -> FleetSummary:
    """Audit every model of ``manifest`` (a ``manifest.yaml`` path or loaded entries) with ``audits`` on
    ``splits`` into the store ``db`` (a path or an open :class:`AuditStore`), skipping every unit the store
    already holds unless ``force`` (module docs).

    ``n`` / ``seed``: size and data seed of the splits built by name. ``settings``: audit name -> overrides of its
    defaults (:func:`resolve_settings`). ``progress``: a callable given each model's :class:`ModelReport` as it
    finishes, True to print its line on stderr, None/False for nothing. ``bars``: the audits' own progress bars.
    ``device``: where the models run (default CUDA when available). ``prefetch``: load the next model in a
    background thread while the current one computes. ``group_prompts``: audit the prompt learners (not CoCoOp)
    that share a backbone together — the backbone loaded and each split encoded once, every head's calibration in
    one pass (:func:`grouped_calibration_rows`); the numbers equal the one-by-one path's to float32 rounding.
    ``artifacts``: store with each unit what the report draws (reliability bins, the first heatmaps, the top
    cluster's regions; :class:`AuditOutput`); not part of any key.
    """
    t_start = time.perf_counter()
    audits, resolved, skeys = check_audits(audits, settings, device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if isinstance(manifest, (str, os.PathLike)):
        entries = load_manifest(manifest)
    else:
        entries = list(manifest)
        for i, e in enumerate(entries):
            if not isinstance(e, ManifestEntry):
                raise TypeError(f"manifest: expected a manifest path or ManifestEntry objects, got "
                                f"{type(e).__name__} at [{i}]")
    split_map = build_splits(splits, n=n, seed=seed)
    summary = FleetSummary()
    plan = {a: [s for s in split_map.values() if AUDITS[a].applies(s)] for a in audits}
    for a, ss in plan.items():
        if not ss:
            summary.notes.append(f"{a}: applies to none of the splits {list(split_map)} (skipped)")
    report = _report_fn(progress)
    options = RunOptions(batch_size=batch_size, progress=bool(bars), artifacts=bool(artifacts))
    store = db if isinstance(db, AuditStore) else AuditStore(db)
    executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmfast-fleet-load") if prefetch else None

    def pending_units(key: str, kind: str) -> tuple[list[tuple[str, Split]], int]:
        todo, have = [], 0
        for a in audits:
            if kind not in AUDITS[a].kinds:
                continue
            for s in plan[a]:
                if not force and store.has(key, a, s.fingerprint, skeys[a]):
                    have += 1
                else:
                    todo.append((a, s))
        return todo, have

    def load(entry: ManifestEntry) -> LoadedModel:
        return load_entry(entry, device=device, progress=None if bars else False)

    def fail(rep: ModelReport, key: str | None, audit: str, e: Exception, entry: ManifestEntry) -> None:
        rep.status = "failed"
        rep.errors.append((audit, _error_text(e)))
        store.record_failure(key, audit, e, name=entry.name, path=str(entry.resolved or entry.path))
        summary.failed.append((entry.name, audit, _error_text(e)))

    groups = prompt_groups(entries) if group_prompts and "calibration" in audits else {}
    grouped = {i for idx in groups.values() for i in idx}
    all_entries, entries = entries, [e for i, e in enumerate(entries) if i not in grouped]

    def run_group(members: list[ManifestEntry]) -> None:
        """The prompt entries of one backbone (module docs of :func:`grouped_calibration_rows`)."""
        import torch

        from vlmfast.fleet.manifest import checkpoint_files
        from vlmfast.models.text import encode_images
        from vlmfast.tuning.prompt import load_prompt_learner

        t0 = time.perf_counter()
        try:
            backbone = load_backbone(members[0], device=device, progress=None if bars else False)
        except Exception as e:
            for entry in members:
                rep = ModelReport(entry.name, "done")
                fail(rep, None, "load", e, entry)
                report(rep)
            return
        from vlmfast.models.text import weights_hash

        hashes: dict[Any, str] = {}
        backbone_hash = weights_hash(backbone)
        precision = resolved.get("calibration", {}).get("precision", "fp32")
        work = []  # (entry, key, rep, todo)
        for entry in members:
            rep = ModelReport(entry.name, "done")
            try:
                key, parts = model_key(entry, backbone if entry.base_backbone else None, cache=hashes)
            except Exception as e:
                fail(rep, None, "load", e, entry)
                report(rep)
                continue
            rep.model_key = key
            store.add_model(key, entry.name, str(entry.resolved or entry.path), model_card(entry, parts))
            todo, rep.reused = pending_units(key, entry.kind)
            summary.reused += rep.reused
            if not todo:
                rep.status, rep.seconds = "skipped", 0.0
                summary.skipped += 1
                report(rep)
                continue
            work.append((entry, key, rep, todo))
        if not work:
            return
        feats: dict[str, Any] = {}
        heads: dict[int, dict[str, Any]] = {}  # work index -> split -> (C, D) class features
        trained: dict[int, list[str]] = {}
        for j, (entry, key, rep, todo) in enumerate(work):
            try:
                learner = load_prompt_learner(checkpoint_files(entry)["learner"], backbone, model_hash=backbone_hash)
            except Exception as e:
                fail(rep, key, "load", e, entry)
                continue
            trained[j], heads[j] = list(learner.classnames), {}
            for a, sp in todo:
                try:
                    if a != "calibration":
                        raise ValueError(f"audit {a!r} does not apply to prompt entries")
                    with torch.no_grad(), _precision(backbone, precision):
                        heads[j][sp.name] = learner.text_features(list(sp.data.classnames)).float().cpu()
                except Exception as e:
                    fail(rep, key, a, e, entry)
            del learner
        for sp in {sp.name: sp for _, _, _, todo in work for _, sp in todo}.values():
            members_j = [j for j in heads if sp.name in heads[j]]
            if not members_j:
                continue
            t_unit = time.perf_counter()
            try:
                if sp.name not in feats:
                    with _precision(backbone, precision):
                        feats[sp.name] = encode_images(backbone, sp.data, batch_size=max(batch_size, 1)).float().cpu()
                scale = backbone.logit_scale.detach().float().exp().cpu() if getattr(
                    backbone, "logit_scale", None) is not None else torch.tensor(100.0)
                stacked = torch.stack([heads[j][sp.name] for j in members_j])
                rows, res = grouped_calibration_rows(feats[sp.name], stacked, scale, sp.data,
                                                     [trained[j] for j in members_j], resolved["calibration"],
                                                     sp.name)
            except Exception as e:
                for j in members_j:
                    entry, key, rep, _ = work[j]
                    fail(rep, key, "calibration", e, entry)
                continue
            per = (time.perf_counter() - t_unit) / len(members_j)
            for m, (j, r) in enumerate(zip(members_j, rows)):
                entry, key, rep, _ = work[j]
                store.write(key, "calibration", sp.fingerprint, resolved["calibration"], r, seconds=per,
                            split_info={sp.name: sp.info},
                            artifacts=[reliability_artifact(sp.name, res, m)] if options.artifacts else None)
                rep.computed.append(("calibration", sp.name))
                summary.computed += 1
        total = time.perf_counter() - t0
        for entry, key, rep, _ in work:
            rep.seconds = total / len(work)
            if rep.status == "done":
                summary.done += 1
            report(rep)

    try:
        # Per entry: (1) hash — in the background, started while the entry before it computes; (2) look up its
        # units — in this thread (the store's connection); (3) load, only if a unit is left — in the background
        # too when it was known to be needed before the entry's turn came.
        hashed: dict[int, cf.Future] = {}
        loads: dict[int, cf.Future] = {}

        def hash_ahead(j: int) -> None:
            if executor is not None and j < len(entries) and j not in hashed:
                hashed[j] = executor.submit(_prepare, entries[j], device, bars)

        hash_ahead(0)
        for i, entry in enumerate(entries):
            t0 = time.perf_counter()
            rep = ModelReport(entry.name, "done")
            try:
                key, parts, loaded = hashed.pop(i).result() if i in hashed else _prepare(entry, device, bars)
            except Exception as e:
                fail(rep, None, "load", e, entry)
                rep.seconds = time.perf_counter() - t0
                report(rep)
                hash_ahead(i + 1)
                continue
            rep.model_key = key
            store.add_model(key, entry.name, str(entry.resolved or entry.path), model_card(entry, parts))
            todo, rep.reused = pending_units(key, entry.kind)
            summary.reused += rep.reused
            hash_ahead(i + 1)
            if not todo:
                loads.pop(i, None)
                rep.status, rep.seconds = "skipped", time.perf_counter() - t0
                summary.skipped += 1
                report(rep)
                continue
            if executor is not None and i + 1 < len(entries):  # prefetch the next model if it has work left
                try:
                    nkey, _, nloaded = hashed[i + 1].result()
                except Exception:
                    pass  # reported when its turn comes (result() raises again)
                else:
                    if nloaded is None and pending_units(nkey, entries[i + 1].kind)[0]:
                        loads[i + 1] = executor.submit(load, entries[i + 1])
            try:
                if loaded is None:
                    loaded = loads.pop(i).result() if i in loads else load(entry)
            except Exception as e:
                fail(rep, key, "load", e, entry)
                rep.seconds = time.perf_counter() - t0
                report(rep)
                continue
            for a, s in todo:
                spec = AUDITS[a]
                target = loaded.clip if spec.target == "clip" else loaded.audited
                t_unit = time.perf_counter()
                try:
                    rows, arts = split_output(spec.fn(target, s, resolved[a], options))
                    bad = [r for r in rows if not isinstance(r, (tuple, list)) or len(r) != 3 or r[0] != s.name]
                    if bad:
                        raise ValueError(f"audit {a!r}: expected rows (split, metric, value) of split {s.name!r}, "
                                         f"got {bad[0]!r:.80}")
                    store.write(key, a, s.fingerprint, resolved[a], rows, seconds=time.perf_counter() - t_unit,
                                split_info={s.name: s.info}, artifacts=arts)
                except Exception as e:
                    fail(rep, key, a, e, entry)
                    continue
                rep.computed.append((a, s.name))
                summary.computed += 1
            del loaded
            rep.seconds = time.perf_counter() - t0
            if rep.status == "done":
                summary.done += 1
            report(rep)
        for idx in groups.values():
            run_group([all_entries[i] for i in idx])
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if not isinstance(db, AuditStore):
            store.close()
    summary.seconds = time.perf_counter() - t_start
    return summary
