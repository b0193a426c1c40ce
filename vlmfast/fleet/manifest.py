"""The fleet manifest: a YAML list of the models a fleet job audits, how to load each, and its identity.

A ``manifest.yaml``::

    version: 1
    models:
      - {name: zs-rn, path: base, kind: base, method: zero-shot}            # the tiny pretrained CLIP
      - {name: zs-vit, path: "base:vlmfast-tiny-vit", kind: base, preset: test}
      - {name: flyp-s1, path: flyp-s1, kind: clip, method: flyp, seed: 1}    # a `vlmfast finetune` folder
      - {name: ft-s1, path: ft-s1/model, kind: classifier, method: ft, seed: 1}
      - {name: mine, path: ckpt/mine.safetensors, kind: clip}                # a vlmfast checkpoint
      - {name: coop-s1, path: coop-s1/learner, kind: prompt, backbone: base}  # a prompt learner on the base

(a bare list of entries is accepted too). Entry fields:

=============  ================================================================================================
``name``       required, unique non-empty str: the label of the model in every table
``path``       required str. ``base`` / ``base:CONFIG`` (kind ``base``): :func:`vlmfast.models.pretrain_base` of
               CONFIG (default ``vlmfast-tiny-rn``) at ``preset``. Otherwise relative to the manifest's folder
               (absolute paths as they are): a ``vlmfast finetune`` output folder (``<out>`` or ``<out>/model``,
               holding ``model.safetensors`` + ``model.json`` + ``head.safetensors``), or a vlmfast checkpoint
               (``<path>`` / ``.safetensors`` / ``.json`` of :func:`vlmfast.models.save_checkpoint`)
``kind``       required: ``"clip"`` (audited as a CLIP model: zero-shot logits at its own logit scale),
               ``"classifier"`` (a finetune folder's image classifier: its head's logits), ``"base"`` or
               ``"prompt"`` (a prompt learner, :meth:`vlmfast.tuning.PromptLearner.save`: ``path`` is the learner
               ``<p>`` / ``<p>.safetensors`` / ``<p>.json``, or a prompt ``vlmfast finetune`` folder holding
               ``learner.safetensors``; audited for calibration only, by its prompts' logits on the backbone)
``backbone``   ``prompt`` entries only, required: the frozen CLIP the learner was trained on — ``base`` /
               ``base:CONFIG`` (at ``preset``) or a vlmfast checkpoint path (relative to the manifest's folder)
``method``     str (default ``""``): how the weights came about (``zero-shot``, ``flyp``, ``ft``, ...)
``seed``       int >= 0 or null (default null)
``preset``     str, ``base`` entries and ``prompt`` entries on a ``base`` backbone only (default ``"test"``): the
               ``pretrain_base`` preset
``tags``       list of str;  ``meta``: a dict of JSON values (anything else a plan wants to keep)
=============  ================================================================================================

:func:`load_manifest` checks the structure of every entry (a ValueError naming the file, the entry and the
field); whether the files exist and load is the runner's business (a model that fails is recorded, the rest go on).

**Identity.** :func:`model_key` is the SHA-256 over the entry's kind and the streamed SHA-256 of each weights file
it loads (the CLIP checkpoint, plus the head for a classifier; :func:`weights_digest`: a safetensors header in
canonical form, since its writer orders the metadata arbitrarily), so a retrained model gets a new key and an
unchanged one — even re-saved — keeps it, whatever its name or path; a ``base`` entry is keyed by the hash of its
pretrained state dict (:func:`vlmfast.models.weights_hash`), which needs the (cached) base; a ``prompt`` entry by
its learner's file and its backbone (file digest, or the weights hash of a ``base`` backbone). **Loading**
(:func:`load_entry`) goes through safetensors and :func:`vlmfast.models.load_checkpoint` only — nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["KINDS", "LoadedModel", "ManifestEntry", "checkpoint_files", "load_backbone", "load_entry", "load_manifest",
           "model_key", "sha256_stream", "weights_digest", "write_manifest"]

KINDS = ("clip", "classifier", "base", "prompt")
MANIFEST_VERSION = 1
BASE_CONFIG = "vlmfast-tiny-rn"
FIELDS = ("name", "path", "kind", "method", "seed", "preset", "tags", "meta", "backbone")
_KEY_FORMAT = "vlmfast-model-key/1"


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml comes with open_clip's huggingface_hub
        raise ImportError(f"pyyaml is needed for fleet manifests: pip install pyyaml (import failed: {e})",
                          name="yaml") from e
    return yaml


def _json_value(v: Any, where: str) -> None:
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: expected finite numbers, got {v!r}")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _json_value(x, f"{where}[{i}]")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: expected str keys, got {type(k).__name__} key {k!r}")
            _json_value(x, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where}: expected JSON values (null, bool, number, str, list, mapping), got "
                     f"{type(v).__name__}")


@dataclass
class ManifestEntry:
    """One model of a manifest (module docs for the fields). ``root``: the folder that a relative ``path`` is
    resolved against (the manifest's folder; default the working directory)."""

    name: str
    path: str
    kind: str
    method: str = ""
    seed: int | None = None
    preset: str = "test"
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    root: Path = field(default_factory=Path, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        self.root = Path(self.root)
        for attr in ("name", "path"):
            v = getattr(self, attr)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{attr}: expected a non-empty str, got {v!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        is_base_path = self.path == "base" or self.path.startswith("base:")
        if self.kind == "base" and not is_base_path:
            raise ValueError(f"path: expected 'base' or 'base:CONFIG' for kind 'base', got {self.path!r}")
        if self.kind != "base" and is_base_path:
            raise ValueError(f"kind: expected 'base' for path {self.path!r}, got {self.kind!r}")
        if self.kind == "base" and self.path.startswith("base:") and not self.path[5:].strip():
            raise ValueError(f"path: expected 'base:CONFIG' with a config name, got {self.path!r}")
        if isinstance(self.backbone, os.PathLike):
            self.backbone = os.fspath(self.backbone)
        if self.kind == "prompt":
            if not isinstance(self.backbone, str) or not self.backbone.strip():
                raise ValueError(f"backbone: expected the learner's CLIP ('base', 'base:CONFIG' or a checkpoint "
                                 f"path) for kind 'prompt', got {self.backbone!r}")
            if self.backbone.startswith("base:") and not self.backbone[5:].strip():
                raise ValueError(f"backbone: expected 'base:CONFIG' with a config name, got {self.backbone!r}")
        elif self.backbone is not None:
            raise ValueError(f"backbone: only for kind 'prompt' entries, got kind {self.kind!r}")
        for attr in ("method", "preset"):
            if not isinstance(getattr(self, attr), str):
                raise ValueError(f"{attr}: expected a str, got {getattr(self, attr)!r}")
        if not self.preset.strip():
            raise ValueError(f"preset: expected a non-empty str, got {self.preset!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ValueError(f"seed: expected an int >= 0 or null, got {self.seed!r}")
        if isinstance(self.tags, str) or not isinstance(self.tags, (list, tuple)) or not all(
                isinstance(t, str) for t in self.tags):
            raise ValueError(f"tags: expected a list of str, got {self.tags!r}")
        self.tags = list(self.tags)
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta: expected a mapping, got {type(self.meta).__name__}")
        _json_value(self.meta, "meta")

    @property
    def base_backbone(self) -> bool:
        """Whether the entry's CLIP comes from :func:`vlmfast.models.pretrain_base` (a ``base`` entry, or a
        ``prompt`` entry on a ``base`` / ``base:CONFIG`` backbone)."""
        if self.kind == "base":
            return True
        return self.kind == "prompt" and (self.backbone == "base" or self.backbone.startswith("base:"))

    @property
    def config(self) -> str | None:
        """The open_clip config of a ``base`` entry or of a prompt entry's ``base`` backbone (None otherwise)."""
        if not self.base_backbone:
            return None
        spec = self.path if self.kind == "base" else self.backbone
        return spec.split(":", 1)[1].strip() if ":" in spec else BASE_CONFIG

    @property
    def backbone_resolved(self) -> Path | None:
        """A ``prompt`` entry's checkpoint backbone resolved against ``root`` (None for a ``base`` backbone and for
        the other kinds)."""
        if self.kind != "prompt" or self.base_backbone:
            return None
        p = Path(self.backbone).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def resolved(self) -> Path | None:
        """The entry's path resolved against ``root`` (None for ``base``)."""
        if self.kind == "base":
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else self.root / p

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """The entry as manifest YAML values; ``path`` relative to ``relative_to`` where it lies inside it."""
        def rel(p: str, resolved: Path | None) -> str:
            if resolved is None or relative_to is None:
                return p
            full = Path(os.path.abspath(resolved))
            try:
                return full.relative_to(Path(os.path.abspath(relative_to))).as_posix()
            except ValueError:
                return str(full)

        out: dict[str, Any] = {"name": self.name, "path": rel(self.path, self.resolved), "kind": self.kind}
        if self.kind == "prompt":
            out["backbone"] = rel(self.backbone, self.backbone_resolved)
        if self.method:
            out["method"] = self.method
        if self.seed is not None:
            out["seed"] = self.seed
        if self.base_backbone:
            out["preset"] = self.preset
        if self.tags:
            out["tags"] = list(self.tags)
        if self.meta:
            out["meta"] = json.loads(json.dumps(self.meta))
        return out


def _entry(d: Any, i: int, where: str, root: Path) -> ManifestEntry:
    label = f"{where}: models[{i}]"
    if not isinstance(d, dict):
        raise ValueError(f"{label}: expected a mapping with name, path and kind, got {type(d).__name__}")
    name = d.get("name")
    if isinstance(name, str) and name.strip():
        label += f" ({name!r})"
    unknown = sorted(str(k) for k in d if k not in FIELDS)
    if unknown:
        raise ValueError(f"{label}: {unknown[0]}: unknown field; expected some of {list(FIELDS)}")
    for req in ("name", "path", "kind"):
        if req not in d:
            raise ValueError(f"{label}: {req}: missing (required: name, path, kind)")
    bb = d.get("backbone")
    on_base = d.get("kind") == "prompt" and isinstance(bb, str) and (bb == "base" or bb.startswith("base:"))
    if d.get("kind") != "base" and not on_base and "preset" in d:
        raise ValueError(f"{label}: preset: only for kind 'base' entries (and 'prompt' entries on a base backbone), "
                         f"got kind {d.get('kind')!r}")
    kwargs = {k: d[k] for k in FIELDS if k in d}
    if kwargs.get("method") is None:
        kwargs.pop("method", None)
    for k in ("tags", "meta"):
        if k in kwargs and kwargs[k] is None:
            kwargs.pop(k)
    try:
        return ManifestEntry(**kwargs, root=root)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: {e}") from e


def load_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """The entries of a ``manifest.yaml`` (module docs), validated, relative paths resolved against the
    manifest's folder. ValueError naming the file, the entry (index and name) and the field; OSError for an
    unreadable file."""
    yaml = _yaml()
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"manifest: expected a YAML file, got the folder {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from e
    if isinstance(doc, dict):
        unknown = sorted(str(k) for k in doc if k not in ("version", "models"))
        if unknown:
            raise ValueError(f"{p}: {unknown[0]}: unknown top-level key; expected 'version' and 'models'")
        version = doc.get("version", MANIFEST_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
            raise ValueError(f"{p}: version: expected an int in 1..{MANIFEST_VERSION}, got {version!r}")
        models = doc.get("models")
    else:
        models = doc
    if not isinstance(models, list):
        raise ValueError(f"{p}: models: expected a list of model entries, got "
                         f"{'nothing' if models is None else type(models).__name__}")
    if not models:
        raise ValueError(f"{p}: models: expected at least one entry, got an empty list")
    root = p.parent
    entries = [_entry(d, i, str(p), root) for i, d in enumerate(models)]
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.name in seen:
            raise ValueError(f"{p}: models[{i}] ({e.name!r}): name: duplicate of models[{seen[e.name]}]")
        seen[e.name] = i
    return entries


def write_manifest(entries: Iterable[ManifestEntry | Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write a manifest (``version`` + ``models``) that :func:`load_manifest` reads back to equal entries; paths
    inside the manifest's folder are written relative to it. Dict entries are validated like loaded ones (their
    relative paths are taken as relative to the manifest's folder). Atomic; creates the folder."""
    from vlmfast._cache import atomic_write_bytes

    yaml = _yaml()
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"path: expected a file path, got the folder {str(out)!r}")
    items = []
    for i, e in enumerate(entries):
        if isinstance(e, Mapping):
            e = _entry(dict(e), i, "entries", out.parent)
        elif not isinstance(e, ManifestEntry):
            raise TypeError(f"entries[{i}]: expected a ManifestEntry or a dict, got {type(e).__name__}")
        items.append(e)
    names = [e.name for e in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"entries: name: duplicate names {dup}")
    doc = {"version": MANIFEST_VERSION, "models": [e.to_dict(relative_to=out.parent) for e in items]}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode())
    return out


# ------------------------------------------------------------------------------------------ files and identity


def _finetune_folder(p: Path) -> Path | None:
    """The folder holding ``head.safetensors`` of a ``vlmfast finetune`` output (``<out>`` or ``<out>/model``)."""
    if (p / "head.safetensors").is_file():
        return p
    if (p / "model" / "head.safetensors").is_file():
        return p / "model"
    return None


def _learner_file(entry: ManifestEntry) -> Path:
    """The ``.safetensors`` of a ``prompt`` entry's learner (``<p>``, ``<p>.safetensors``/``.json`` or a folder
    holding ``learner.safetensors``)."""
    from vlmfast.models.checkpoint import checkpoint_paths

    p = entry.resolved
    if p.is_dir():
        if not (p / "learner.safetensors").is_file():
            raise ValueError(f"entry {entry.name!r}: {p} is a folder without learner.safetensors (expected a prompt "
                             f"learner saved by PromptLearner.save, or the output of `vlmfast finetune --method "
                             f"coop|cocoop|kgcoop`)")
        return p / "learner.safetensors"
    return checkpoint_paths(p)[0]


def checkpoint_files(entry: ManifestEntry) -> dict[str, Path]:
    """The weights files an entry loads, by role: ``{"model": ...}`` (the CLIP checkpoint's safetensors) and, for a
    classifier, ``"head"``; for a prompt entry ``"learner"`` and, on a checkpoint backbone, ``"backbone"``.
    ``FileNotFoundError`` naming the entry for a missing file; ValueError for a ``base`` entry (it has no file of
    its own) or a folder that is not a finetune output."""
    from vlmfast.models.checkpoint import checkpoint_paths

    if entry.kind == "base":
        raise ValueError(f"entry {entry.name!r}: a 'base' entry has no checkpoint file (it is keyed by its weights)")
    p = entry.resolved
    if entry.kind == "prompt":
        files = {"learner": _learner_file(entry)}
        if not entry.base_backbone:
            files["backbone"] = checkpoint_paths(entry.backbone_resolved)[0]
    elif p.is_dir():
        folder = _finetune_folder(p)
        if folder is None:
            hint = " (a prompt learner: use kind 'prompt' with its backbone)" if (p / "learner.json").is_file() else ""
            raise ValueError(f"entry {entry.name!r}: {p} is a folder without head.safetensors (expected the output "
                             f"of `vlmfast finetune`){hint}")
        files = {"model": folder / "model.safetensors"}
        if entry.kind == "classifier":
            files["head"] = folder / "head.safetensors"
    else:
        if entry.kind == "classifier":
            raise ValueError(f"entry {entry.name!r}: kind 'classifier' needs a `vlmfast finetune` folder (with "
                             f"head.safetensors), got the file path {str(p)!r}")
        files = {"model": checkpoint_paths(p)[0]}
    for role, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"entry {entry.name!r}: {f}: no such file")
    return files


def sha256_stream(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks of ``chunk`` bytes (memory bounded whatever its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


#: The largest safetensors header read for :func:`weights_digest` (a longer one is hashed as plain bytes).
_MAX_HEADER = 100 << 20


def weights_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The streamed SHA-256 (hex) of a weights file, invariant to how its writer ordered the safetensors header.

    safetensors writes its ``__metadata__`` dict in an arbitrary order (a hash map), so saving the same weights
    twice can give different bytes. For a ``.safetensors`` file the header is therefore hashed in canonical form
    (JSON, keys sorted) followed by the data bytes as they are; any other file (``.pt``, or a header that does not
    parse — it will fail to load anyway) is hashed byte for byte (:func:`sha256_stream`)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            header = None
            if 0 < n <= min(size - 8, _MAX_HEADER):
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, ValueError):
                    header = None
            if isinstance(header, dict):
                h = hashlib.sha256(b"vlmfast-safetensors-digest/1\n")
                h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
                for block in iter(lambda: f.read(chunk), b""):
                    h.update(block)
                return h.hexdigest()
    return sha256_stream(p, chunk)


def _combine(kind: str, parts: Mapping[str, str]) -> str:
    text = _KEY_FORMAT + f"\nkind={kind}\n" + "".join(f"{role}={parts[role]}\n" for role in sorted(parts))
    return hashlib.sha256(text.encode()).hexdigest()


def model_key(entry: ManifestEntry, model: Any = None, *, cache: dict[Any, str] | None = None
              ) -> tuple[str, dict[str, str]]:
    """``(model_key, {role: sha256})`` of an entry (module docs). File entries are hashed without loading; a
    ``base`` entry needs its loaded ``model`` (the roles are then ``{"weights": weights_hash(model)}``), and so does
    a ``prompt`` entry on a ``base`` backbone (``{"learner": ..., "backbone": weights_hash(model)}``). ``cache``: a
    dict the caller keeps while the files cannot change (one fleet run), so that a backbone shared by many prompt
    entries is hashed once (keys: a file's path, size and mtime; the id of ``model``)."""
    def digest(f: Path) -> str:
        if cache is None:
            return weights_digest(f)
        st = os.stat(f)
        k = ("file", str(Path(f).resolve()), st.st_size, st.st_mtime_ns)
        if k not in cache:
            cache[k] = weights_digest(f)
        return cache[k]

    if entry.base_backbone:
        if model is None:
            raise ValueError(f"entry {entry.name!r}: a {entry.kind!r} entry on the base model is keyed by its loaded "
                             f"weights; pass model=")
        from vlmfast.models.text import weights_hash

        if cache is None:
            wh = weights_hash(model)
        else:
            wh = cache.get(("model", id(model))) or cache.setdefault(("model", id(model)), weights_hash(model))
        if entry.kind == "base":
            parts = {"weights": wh}
        else:
            parts = {"learner": digest(checkpoint_files(entry)["learner"]), "backbone": wh}
    else:
        parts = {role: digest(f) for role, f in checkpoint_files(entry).items()}
    return _combine(entry.kind, parts), parts


@dataclass
class LoadedModel:
    """A loaded entry: ``clip`` (the CLIP model, eval mode; a prompt entry's backbone), ``classifier`` (an
    :class:`vlmfast.tuning.robust.ImageClassifier` for kind ``classifier``, else None), ``learner`` (the
    :class:`vlmfast.tuning.PromptLearner` of a ``prompt`` entry, else None) and the checkpoint ``card``.
    ``audited`` is what the calibration and rationality audits look at: the classifier or learner where there is
    one."""

    entry: ManifestEntry
    clip: Any
    classifier: Any = None
    card: dict[str, Any] = field(default_factory=dict)
    learner: Any = None

    @property
    def audited(self) -> Any:
        if self.learner is not None:
            return self.learner
        return self.classifier if self.classifier is not None else self.clip


def load_backbone(entry: ManifestEntry, *, device: Any = None, progress: bool | None = False) -> Any:
    """The CLIP backbone of a ``prompt`` entry (eval mode): ``pretrain_base``'s cached model for a base backbone,
    else its checkpoint (SHA-256 verified)."""
    if entry.base_backbone:
        from vlmfast.models import pretrain_base

        model, _ = pretrain_base(config=entry.config, preset=entry.preset, device=device, progress=progress)
    else:
        from vlmfast.models import load_checkpoint

        model, _ = load_checkpoint(checkpoint_files(entry)["backbone"], device=device)
    return model.eval()


def load_entry(entry: ManifestEntry, *, device: Any = None, progress: bool | None = False) -> LoadedModel:
    """Load an entry (module docs): ``base`` through :func:`vlmfast.models.pretrain_base` (cached), a finetune
    folder through :func:`vlmfast.tuning.robust.load_robust`, a checkpoint through
    :func:`vlmfast.models.load_checkpoint` (SHA-256 verified against its card), a prompt learner through
    :func:`vlmfast.tuning.load_prompt_learner` on its backbone (loaded as a ``base`` entry or a checkpoint).
    Safetensors only. Raises the loader's error (:class:`vlmfast.models.CheckpointError`, FileNotFoundError, ...)
    for a broken model."""
    if entry.kind == "prompt":
        files = checkpoint_files(entry)
        model = load_backbone(entry, device=device, progress=progress)
        from vlmfast.tuning.prompt import load_prompt_learner

        learner = load_prompt_learner(files["learner"], model)
        return LoadedModel(entry, model, None, dict(getattr(learner, "card_on_disk", {}) or {}), learner.eval())
    if entry.kind == "base":
        from vlmfast.models import pretrain_base

        model, card = pretrain_base(config=entry.config, preset=entry.preset, device=device, progress=progress)
        return LoadedModel(entry, model.eval(), None, dict(card))
    files = checkpoint_files(entry)  # checks the layout and that every file is there
    p = entry.resolved
    if p.is_dir():
        from vlmfast.tuning.robust import load_robust

        model, clf, card = load_robust(files["model"].parent, device=device)
        return LoadedModel(entry, model.eval(), clf.eval() if entry.kind == "classifier" else None, dict(card))
    from vlmfast.models import load_checkpoint

    model, card = load_checkpoint(files["model"], device=device)
    return LoadedModel(entry, model.eval(), None, dict(card))
