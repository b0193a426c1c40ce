"""Fine-tuning plans: methods x hyper-parameters x seeds x data variants, run into one folder per run, resumable,
with a fleet ``manifest.yaml`` that :func:`vlmfast.fleet.audit_fleet` reads as it is.

A ``plan.yaml``::

    version: 1
    model: base                 # 'base': pretrain_base(base_config, preset=base_preset), cached; or an open_clip
    base_config: vlmfast-tiny-rn  #   config name at random init (seeded by model_seed), e.g. vlmfast-tiny-rn
    base_preset: test
    defaults: {steps: 200, train_n: 2000, seed: [0, 1]}   # merged into every entry that takes the field
    runs:
      - {method: zs}                                        # the base itself, as a manifest entry
      - {name: flyp, method: flyp, strength: [0.0, 0.95]}   # 2 strengths x 2 seeds = 4 runs
      - {name: wise, method: wise-ft, from: flyp, alpha: [0.5]}   # one per flyp run and alpha
      - {name: shortcut, method: flyp, strength: 0.95, seed: 0}
      - {name: ravl, method: ravl, discover_from: shortcut, strength: 0.95, seed: 0}
      - {name: coop, method: coop, dor: [false, true], seed: 0}

Top-level keys: ``version`` (1), ``model``, ``base_config``, ``base_preset``, ``model_seed`` (0), ``device``
(null: CUDA when available), ``checkpoint_every`` (100: the training engine's resumable checkpoints, in
``<run>/train``), ``keep_checkpoints`` (false: ``<run>/train`` is removed once the run is done), ``defaults`` and
``runs`` (required, a non-empty list of entries).

**Entries.** ``method`` (required): ``flyp``, ``carot``, ``ft``, ``lp``, ``lpft`` (:func:`vlmfast.tuning.robust.fit`),
``wise-ft`` (the WiSE-FT interpolation of a robust run with the zero-shot model at ``alpha``: every tensor of the
CLIP model and of the classifier, :func:`vlmfast.tuning.robust.interpolate_`), ``ravl``
(:func:`vlmfast.tuning.region.fit` on regions split by :func:`~vlmfast.tuning.region.split_regions` with the
Stage-1 model of a discovery), ``coop``, ``cocoop``, ``kgcoop`` (:func:`vlmfast.tuning.fit`; ``dor``), ``zs`` (the
base, untrained). ``name``: the entry's label (``[A-Za-z0-9._-]``, unique; default the method), the prefix of its
run ids and what ``from`` / ``discover_from`` refer to. Fields (each checked; a ValueError names the plan file,
the entry and the field):

=====================  ==========================================================================================
every trained method   ``seed`` (0; data and training seed), ``steps`` (200), ``batch_size`` (128 robust and ravl,
                       32 prompt), ``lr`` (the method's default; ravl 1e-4 as ``vlmfast finetune``), ``train_n``
                       (2000; the size of ``spurious_mnist("train")``), ``strength`` (Cramer's V of the red square
                       with "nine", in [0, 1); 0, ravl 0.95; prompt methods 0 only), ``weight_decay``, ``warmup``,
                       ``data`` (data variants: a list of ``{strength, train_n}`` mappings), ``tags``
robust methods         ``grad_clip``, ``targets``, ``lam_oc``, ``lam_cf``, ``lam_sd``, ``oc_squared``,
                       ``ema_every``, ``lp_steps``, ``lp_lr`` (as :func:`vlmfast.tuning.robust.fit`)
``wise-ft``            ``from`` (required: an flyp / carot / ft entry; one WiSE-FT run per run of it and alpha),
                       ``alpha`` (required, in [0, 1]), ``tags``
``ravl``               ``discovery`` (the output folder of ``vlmfast audit spurious``) or ``discover_from`` (an
                       entry of this plan, run first; the shortcut model whose discovery runs here:
                       :func:`vlmfast.audit.spurious.discover` on ``spurious_mnist("test", discovery_n,
                       seed=discovery_seed)`` with ``discovery_ks`` ``[A, B]`` and ``discovery_threshold``), ``lam``
                       (0.8), ``temperature``, ``grad_clip``
prompt methods         ``dor`` (false), ``shots`` (16), ``n_ctx``, ``ctx_init``, ``position``, ``csc``, ``dor_k``,
                       ``dor_lam``, ``lam`` (KgCoOp)
=====================  ==========================================================================================

**Expansion.** A list value sweeps the field (``strength: [0.0, 0.95]``; ``tags`` and ``discovery_ks`` are lists by
nature and never sweep); the runs of an entry are the cartesian product of its swept fields and its data variants.
A ``wise-ft`` entry has one run per run of ``from`` and alpha; a ``ravl`` run with ``discover_from`` is paired with
the run of that entry of the same seed (then the same strength) where there are several.

**Run ids.** ``<name>-<swept values>-<hash>`` (e.g. ``flyp-seed1-strength0.95-3f9c0a12d4``): the hash is the
SHA-256 of the run's resolved settings (method, model, data, every given hyper-parameter, the run ids it depends on,
a discovery folder's medoid digest) in canonical JSON, so it is stable across sessions, machines and the order of
the plan, and a changed setting is a new run.

**Running** (:func:`run_plan`): in dependency order; a run whose ``<out>/<run_id>/DONE`` holds its settings hash
is skipped; any other run folder is cleared (apart from the engine's checkpoints in ``train/``, so an interrupted
training resumes where it stopped, :mod:`vlmfast.train`) and the run redone: outputs first (``model/`` — the CLIP
``model.safetensors`` + ``model.json`` card and ``head.safetensors`` of :meth:`RobustResult.save` — or
``learner.safetensors`` + ``learner.json``; ``run.json``: settings and training log), ``DONE`` last, atomically.
A run that raises is recorded (the summary, ``<out>/failures.json``) and the others go on (those that depend on it
fail too); ``KeyboardInterrupt`` stops the plan, and a restart redoes only the unfinished runs. ``<out>/manifest.yaml``
lists every finished run (:func:`vlmfast.fleet.write_manifest`): kind ``classifier`` for the robust, WiSE-FT and
RaVL runs, ``prompt`` (on its backbone) for learners, ``base`` (or the saved random-init model, kind ``clip``) for
``zs``; ``meta`` keeps the run id, settings hash, strength and train_n.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["METHODS", "Plan", "PlanRun", "PlanSummary", "RunReport", "load_plan", "plan_from_dict", "run_plan"]

PLAN_VERSION = 1
ROBUST_METHODS = ("flyp", "carot", "ft", "lp", "lpft")
PROMPT_METHODS = ("coop", "cocoop", "kgcoop")
METHODS = ROBUST_METHODS + ("wise-ft", "ravl") + PROMPT_METHODS + ("zs",)
#: Methods whose run folder holds a ``vlmfast finetune``-style ``model/`` (CLIP + head).
MODEL_METHODS = ROBUST_METHODS + ("wise-ft", "ravl")
TOP_KEYS = ("version", "model", "base_config", "base_preset", "model_seed", "device", "checkpoint_every",
            "keep_checkpoints", "defaults", "runs")
_RUN_FORMAT = "vlmfast-plan-run/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------------- field checks


def _int(low: int) -> Callable[[Any], Any]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"expected an int >= {low}, got {v!r}")
        return v
    return check


def _real(low: float = 0.0, high: float | None = None, *, strict_low: bool = False, high_open: bool = False,
          null: bool = False) -> Callable[[Any], Any]:
    def check(v: Any) -> float | None:
        if v is None and null:
            return None
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ok = ok and (v > low if strict_low else v >= low)
        ok = ok and (high is None or (v < high if high_open else v <= high))
        if not ok:
            rng = (f"{'(' if strict_low else '['}{low}, {high}{')' if high_open else ']'}" if high is not None
                   else f"{'>' if strict_low else '>='} {low}")
            raise ValueError(f"expected a finite number {'in ' if high is not None else ''}{rng}"
                             f"{' or null' if null else ''}, got {v!r}")
        return float(v)
    return check


def _choice(*choices: str) -> Callable[[Any], Any]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise ValueError(f"expected one of {choices}, got {v!r}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty str, got {v!r}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _name(v: Any) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise ValueError(f"expected a name of letters, digits, '.', '_' and '-' (not starting with a symbol), "
                         f"got {v!r}")
    return v


def _tags(v: Any) -> list[str]:
    if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise ValueError(f"expected a list of str, got {v!r}")
    return list(v)


def _warmup(v: Any) -> int | float:
    if isinstance(v, bool) or not (isinstance(v, int) and v >= 0 or isinstance(v, float) and math.isfinite(v)
                                   and 0.0 <= v < 1.0):
        raise ValueError(f"expected an int number of steps >= 0 or a fraction in [0, 1), got {v!r}")
    return v


def _ks(v: Any) -> list[int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(k, int) and not isinstance(k, bool) for k in v)
            and 2 <= v[0] < v[1]):
        raise ValueError(f"expected [A, B] with 2 <= A < B, got {v!r}")
    return list(v)


#: field -> (check, sweepable). A list given for a sweepable field is a sweep of checked values.
FIELDS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "name": (_name, False), "method": (_choice(*METHODS), False), "tags": (_tags, False),
    "seed": (_int(0), True), "steps": (_int(1), True), "batch_size": (_int(1), True),
    "lr": (_real(0.0, strict_low=True, null=True), True), "train_n": (_int(20), True),
    "strength": (_real(0.0, 1.0, high_open=True), True), "weight_decay": (_real(0.0), True),
    "warmup": (_warmup, True), "grad_clip": (_real(0.0, strict_low=True, null=True), True),
    "targets": (_choice("clip", "class"), True), "lam_oc": (_real(0.0), True), "lam_cf": (_real(0.0), True),
    "lam_sd": (_real(0.0), True), "oc_squared": (_bool, True), "ema_every": (_int(1), True),
    "lp_steps": (_int(1), True), "lp_lr": (_real(0.0, strict_low=True), True),
    "from": (_name, False), "alpha": (_real(0.0, 1.0), True),
    "discovery": (_str, False), "discover_from": (_name, False), "lam": (_real(0.0), True),
    "temperature": (_real(0.0, strict_low=True), True), "discovery_n": (_int(20), False),
    "discovery_seed": (_int(0), False), "discovery_ks": (_ks, False),
    "discovery_threshold": (_real(0.0, 1.0), False),
    "dor": (_bool, True), "shots": (_int(1), True), "n_ctx": (_int(1), True), "ctx_init": (_opt_str, True),
    "position": (_choice("end", "middle", "front"), True), "csc": (_bool, True), "dor_k": (_int(1), True),
    "dor_lam": (_real(0.0), True),
}
_TRAINED = ("name", "method", "tags", "seed", "steps", "batch_size", "lr", "train_n", "strength", "weight_decay",
            "warmup", "data")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    **{m: _TRAINED + ("grad_clip", "targets", "lam_oc", "lam_cf", "lam_sd", "oc_squared", "ema_every", "lp_steps",
                      "lp_lr") for m in ROBUST_METHODS},
    "wise-ft": ("name", "method", "tags", "from", "alpha"),
    "ravl": _TRAINED + ("grad_clip", "discovery", "discover_from", "lam", "temperature", "discovery_n",
                        "discovery_seed", "discovery_ks", "discovery_threshold"),
    **{m: _TRAINED + ("dor", "shots", "n_ctx", "ctx_init", "position", "csc", "dor_k", "dor_lam", "lam")
       for m in PROMPT_METHODS},
    "zs": ("name", "method", "tags"),
}
DATA_FIELDS = ("strength", "train_n")
#: Plan defaults written into every run's settings (and so its hash) where the entry does not set them.
RUN_DEFAULTS = {"seed": 0, "steps": 200, "train_n": 2000}
DISCOVERY_DEFAULTS = {"discovery_n": 200, "discovery_seed": 0, "discovery_ks": None, "discovery_threshold": 0.25}


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class PlanRun:
    """One run of a plan: ``run_id`` (folder name under the output), the ``entry`` name it expands from and its
    index, ``method``, ``settings`` (the resolved settings: plain JSON, what ``settings_hash`` hashes), the run ids
    it ``depends_on`` (a WiSE-FT source, a discovery model) and the ``tags`` of its manifest entry."""

    run_id: str
    entry: str
    index: int
    method: str
    settings: dict[str, Any]
    settings_hash: str
    depends_on: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list, repr=False)

    @property
    def seed(self) -> int | None:
        return self.settings.get("seed")

    @property
    def strength(self) -> float | None:
        return self.settings.get("data", {}).get("strength")


@dataclass
class Plan:
    """A validated plan (module docs): its source ``path``, the model settings, the engine's checkpointing and the
    expanded ``runs`` in execution order (every run after the runs it depends on)."""

    path: Path | None
    model: str
    base_config: str
    base_preset: str
    model_seed: int
    device: str | None
    checkpoint_every: int | None
    keep_checkpoints: bool
    runs: list[PlanRun]

    @property
    def model_spec(self) -> dict[str, Any]:
        """The model every run starts from, as it enters the settings hash."""
        if self.model == "base":
            return {"model": "base", "config": self.base_config, "preset": self.base_preset}
        return {"model": self.model, "init_seed": self.model_seed}

    def run(self, run_id: str) -> PlanRun:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"run_id: no run {run_id!r} in the plan")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of a run's resolved settings in canonical JSON (keys sorted)."""
    return hashlib.sha256((_RUN_FORMAT + "\n" + _canonical(settings)).encode()).hexdigest()


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        text = f"{v:g}"
    else:
        text = str(v)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _yaml():
    from vlmfast.fleet.manifest import _yaml as y

    return y()


def load_plan(path: str | os.PathLike) -> Plan:
    """The plan of a ``plan.yaml`` (module docs), validated and expanded. ValueError naming the file, the entry and
    the field; OSError for an unreadable file. A ``discovery`` folder given relatively is resolved against the
    plan's folder."""
    yaml = _yaml()
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"plan: expected a YAML file, got the folder {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from e
    return plan_from_dict(doc, where=str(p), root=p.parent, path=p)


def _top(doc: Mapping[str, Any], where: str, key: str, default: Any, check: Callable[[Any], Any]) -> Any:
    if key not in doc or doc[key] is None and default is None:
        return default
    try:
        return check(doc[key])
    except ValueError as e:
        raise ValueError(f"{where}: {key}: {e}") from None


def _check_field(key: str, value: Any, label: str) -> Any:
    check, sweepable = FIELDS[key]
    try:
        if sweepable and isinstance(value, list):
            if not value:
                raise ValueError("expected a value or a non-empty list of values to sweep, got []")
            out = [check(v) for v in value]
            if len({_canonical(v) for v in out}) != len(out):
                raise ValueError(f"expected distinct values to sweep, got {value!r}")
            return out
        return check(value)
    except ValueError as e:
        raise ValueError(f"{label}: {key}: {e}") from None


def _data_variants(value: Any, label: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{label}: data: expected a non-empty list of {{strength, train_n}} mappings, got {value!r}")
    out = []
    for i, d in enumerate(value):
        if not isinstance(d, dict) or not d:
            raise ValueError(f"{label}: data[{i}]: expected a non-empty mapping with some of {list(DATA_FIELDS)}, "
                             f"got {d!r}")
        unknown = sorted(str(k) for k in d if k not in DATA_FIELDS)
        if unknown:
            raise ValueError(f"{label}: data[{i}]: {unknown[0]}: unknown field; expected some of {list(DATA_FIELDS)}")
        out.append({k: _check_field(k, v, f"{label}: data[{i}]") for k, v in d.items()})
        if any(isinstance(v, list) for v in out[-1].values()):
            raise ValueError(f"{label}: data[{i}]: expected single values (the list of variants is the sweep), got "
                             f"{d!r}")
    if len({_canonical(d) for d in out}) != len(out):
        raise ValueError(f"{label}: data: expected distinct variants, got {value!r}")
    return out


def plan_from_dict(doc: Any, *, where: str = "plan", root: str | os.PathLike | None = None,
                   path: str | os.PathLike | None = None) -> Plan:
    """A :class:`Plan` from parsed YAML values (:func:`load_plan` without the file); ``where`` labels the errors,
    ``root`` resolves relative ``discovery`` folders (default the working directory)."""
    root = Path(root) if root is not None else Path()
    if not isinstance(doc, dict):
        got = type(doc).__name__ if doc is not None else "nothing"
        raise ValueError(f"{where}: expected a mapping with 'runs', got {got}")
    unknown = sorted(str(k) for k in doc if k not in TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: {unknown[0]}: unknown top-level key; expected some of {list(TOP_KEYS)}")
    version = doc.get("version", PLAN_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
        raise ValueError(f"{where}: version: expected an int in 1..{PLAN_VERSION}, got {version!r}")
    model = _top(doc, where, "model", "base", _str)
    if model != "base":
        from vlmfast.models.factory import list_models
    if model != "base" and model not in list_models():
        raise ValueError(f"{where}: model: expected 'base' or an open_clip config name (e.g. vlmfast-tiny-rn), got "
                         f"{model!r}")
    base_config = _top(doc, where, "base_config", "vlmfast-tiny-rn", _str)
    if model != "base" and "base_config" in doc:
        raise ValueError(f"{where}: base_config: only with model: base, got model {model!r}")
    base_preset = _top(doc, where, "base_preset", "test", _str)
    model_seed = _top(doc, where, "model_seed", 0, _int(0))
    device = _top(doc, where, "device", None, _opt_str)
    checkpoint_every = _top(doc, where, "checkpoint_every", 100, lambda v: None if v is None else _int(1)(v))
    keep = _top(doc, where, "keep_checkpoints", False, _bool)
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"{where}: defaults: expected a mapping of entry fields, got {type(defaults).__name__}")
    for k in defaults:
        if k not in FIELDS and k != "data" or k in ("name", "method", "from", "discover_from"):
            raise ValueError(f"{where}: defaults: {k}: not a field every entry can share; expected some of "
                             f"{sorted(set(FIELDS) - {'name', 'method', 'from', 'discover_from'} | {'data'})}")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{where}: runs: expected a non-empty list of entries, got "
                         f"{'nothing' if runs is None else runs if runs == [] else type(runs).__name__}")
    model_spec = ({"model": "base", "config": base_config, "preset": base_preset} if model == "base"
                  else {"model": model, "init_seed": model_seed})

    # 1. entries: checked fields (defaults merged where the method takes them)
    entries: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    for i, d in enumerate(runs):
        label = f"{where}: runs[{i}]"
        if not isinstance(d, dict):
            raise ValueError(f"{label}: expected a mapping with a method, got {type(d).__name__}")
        if isinstance(d.get("name"), str):
            label += f" ({d['name']!r})"
        if "method" not in d:
            raise ValueError(f"{label}: method: missing (required; one of {METHODS})")
        method = _check_field("method", d["method"], label)
        name = _check_field("name", d["name"], label) if "name" in d else method
        label = f"{where}: runs[{i}] ({name!r})"
        allowed = METHOD_FIELDS[method]
        for k in d:
            if k not in FIELDS and k != "data":
                raise ValueError(f"{label}: {k}: unknown field; expected some of {list(allowed)}")
            if k not in allowed:
                raise ValueError(f"{label}: {k}: not a field of method {method!r}; expected some of {list(allowed)}")
        e: dict[str, Any] = {k: v for k, v in defaults.items() if k in allowed}
        if isinstance(d.get("data"), list):  # the entry's data variants override the defaults' data fields
            for var in d["data"]:
                for k in (var if isinstance(var, dict) else ()):
                    e.pop(k, None)
        if any(k in d for k in DATA_FIELDS):
            e.pop("data", None)
        e.update(d)
        checked = {}
        for k, v in e.items():
            if k == "data":
                checked[k] = _data_variants(v, label)
            elif v is None and k in ("lr", "grad_clip", "ctx_init"):
                checked[k] = None
            else:
                checked[k] = _check_field(k, v, label)
        checked.setdefault("name", method)
        if checked["name"] in names:
            raise ValueError(f"{label}: name: duplicate of runs[{names[checked['name']]}] (give each entry its own "
                             f"name)")
        names[checked["name"]] = i
        for k in DATA_FIELDS:
            if k in checked and "data" in checked:
                raise ValueError(f"{label}: {k}: set both as a field and in the data variants; use one")
        if method in PROMPT_METHODS:
            strengths = [checked.get("strength", 0.0)] if "data" not in checked else [
                v.get("strength", 0.0) for v in checked["data"]]
            flat = [x for s in strengths for x in (s if isinstance(s, list) else [s])]
            if any(s != 0.0 for s in flat):
                raise ValueError(f"{label}: strength: prompt tuning trains on the unbiased build; expected 0, got "
                                 f"{checked.get('strength', strengths)!r}")
        if method == "wise-ft":
            for req in ("from", "alpha"):
                if req not in checked:
                    raise ValueError(f"{label}: {req}: missing (required for method 'wise-ft')")
        if method == "ravl":
            if ("discovery" in checked) == ("discover_from" in checked):
                raise ValueError(f"{label}: discovery: expected exactly one of discovery (a `vlmfast audit spurious` "
                                 f"folder) and discover_from (an entry of this plan)")
            lams = checked.get("lam", 0.8)
            if any(v > 1 for v in (lams if isinstance(lams, list) else [lams])):
                raise ValueError(f"{label}: lam: expected a weight in [0, 1], got {lams!r}")
            if "discovery" in checked:
                checked["discovery"] = _discovery_folder(checked["discovery"], root, f"{label}: discovery")
        checked["_label"] = label
        checked["_index"] = i
        entries.append(checked)

    # 2. order: every entry after the entries it refers to (stable otherwise)
    by_name = {e["name"]: e for e in entries}
    deps: dict[str, str | None] = {}
    for e in entries:
        ref_key = "from" if e["method"] == "wise-ft" else "discover_from" if "discover_from" in e else None
        if ref_key is None:
            deps[e["name"]] = None
            continue
        ref = e[ref_key]
        if ref not in by_name:
            raise ValueError(f"{e['_label']}: {ref_key}: no entry named {ref!r} in the plan (names: "
                             f"{sorted(by_name)})")
        src = by_name[ref]["method"]
        ok = ("flyp", "carot", "ft") if ref_key == "from" else MODEL_METHODS
        if src not in ok:
            why = (" (LP / LP-FT heads read raw features, the zero-shot head normalized ones)"
                   if src in ("lp", "lpft") and ref_key == "from" else "")
            raise ValueError(f"{e['_label']}: {ref_key}: expected an entry of method {ok}, got {ref!r} of method "
                             f"{src!r}{why}")
        deps[e["name"]] = ref
    order: list[dict[str, Any]] = []
    placed: set[str] = set()
    pending = list(entries)
    while pending:
        for e in pending:
            d = deps[e["name"]]
            if d is None or d in placed:
                order.append(e)
                placed.add(e["name"])
                pending.remove(e)
                break
        else:
            key = "from" if pending[0]["method"] == "wise-ft" else "discover_from"
            raise ValueError(f"{pending[0]['_label']}: {key}: the entries {[e['name'] for e in pending]} depend on "
                             f"each other in a cycle")

    # 3. expansion
    runs_out: list[PlanRun] = []
    by_entry: dict[str, list[PlanRun]] = {}
    for e in order:
        made = _expand(e, model_spec, by_entry)
        by_entry[e["name"]] = made
        runs_out.extend(made)
    seen: dict[str, PlanRun] = {}
    for r in runs_out:
        if r.run_id in seen:
            raise ValueError(f"{where}: runs[{r.index}] ({r.entry!r}): run {r.run_id!r} is also a run of entry "
                             f"{seen[r.run_id].entry!r} (same name and settings)")
        seen[r.run_id] = r
    return Plan(path=Path(path) if path is not None else None, model=model, base_config=base_config,
                base_preset=base_preset, model_seed=model_seed, device=device, checkpoint_every=checkpoint_every,
                keep_checkpoints=keep, runs=runs_out)


def _discovery_folder(value: str, root: Path, label: str) -> dict[str, Any]:
    from vlmfast.fleet.manifest import sha256_stream

    p = Path(value).expanduser()
    p = p if p.is_absolute() else root / p
    if not (p / "results.json").is_file() or not (p / "medoids.safetensors").is_file():
        raise ValueError(f"{label}: expected a folder with results.json and medoids.safetensors (the output of "
                         f"`vlmfast audit spurious`), got {str(p)!r}")
    return {"path": str(Path(os.path.abspath(p))), "medoids_sha256": sha256_stream(p / "medoids.safetensors")}


def _expand(e: dict[str, Any], model_spec: dict[str, Any], by_entry: dict[str, list[PlanRun]]) -> list[PlanRun]:
    method, name = e["method"], e["name"]
    fields = {k: v for k, v in e.items() if not k.startswith("_") and k not in ("name", "method", "tags", "data")}
    swept = [k for k in FIELDS if k in fields and FIELDS[k][1] and isinstance(fields[k], list)]
    variants = e.get("data") or [{}]
    tags = list(e.get("tags", []))
    out: list[PlanRun] = []
    for values in itertools.product(*[fields[k] for k in swept]):
        run_fields = dict(fields)
        run_fields.update(zip(swept, values))
        label = [f"{k}{_fmt(v)}" for k, v in zip(swept, values) if len(fields[k]) > 1]
        for var in variants:
            vlabel = list(label) + ([f"{k}{_fmt(v)}" for k, v in var.items()] if len(variants) > 1 else [])
            if method == "wise-ft":
                for src in by_entry[run_fields["from"]]:
                    settings = {"method": method, "model": model_spec, "from": src.run_id,
                                "alpha": run_fields["alpha"], "seed": src.seed,
                                "data": dict(src.settings.get("data", {}))}
                    out.append(_make_run(name, e["_index"], method, settings, [src.run_id], tags,
                                         vlabel + src.label))
                continue
            if method == "zs":
                out.append(_make_run(name, e["_index"], method, {"method": "zs", "model": model_spec}, [], tags, []))
                continue
            data = {"train_n": run_fields.pop("train_n", RUN_DEFAULTS["train_n"]),
                    "strength": run_fields.pop("strength", 0.95 if method == "ravl" else 0.0)}
            data.update(var)
            hp = {k: v for k, v in run_fields.items()
                  if k not in ("seed", "discovery", "discover_from") and not k.startswith("discovery_")}
            hp.setdefault("steps", RUN_DEFAULTS["steps"])
            settings = {"method": method, "model": model_spec, "seed": run_fields.get("seed", RUN_DEFAULTS["seed"]),
                        "data": data, "hparams": hp}
            deps: list[str] = []
            if method in PROMPT_METHODS:
                settings["hparams"].setdefault("dor", False)
            if method == "ravl":
                disc = {k: run_fields.get(k, v) for k, v in DISCOVERY_DEFAULTS.items()}
                if "discovery" in run_fields:
                    settings["discovery"] = dict(run_fields["discovery"])
                else:
                    src = _pair(e, by_entry[run_fields["discover_from"]], settings)
                    settings["discovery"] = {"from": src.run_id, **disc}
                    deps = [src.run_id]
            out.append(_make_run(name, e["_index"], method, settings, deps, tags, vlabel))
    return out


def _pair(e: dict[str, Any], candidates: list[PlanRun], settings: dict[str, Any]) -> PlanRun:
    """The run of ``discover_from`` a ravl run uses: the only one, else the one of the same seed (then strength)."""
    pool = list(candidates)
    if len(pool) > 1:
        pool = [r for r in pool if r.seed == settings["seed"]] or pool
    if len(pool) > 1:
        pool = [r for r in pool if r.strength == settings["data"]["strength"]] or pool
    if len(pool) != 1:
        raise ValueError(f"{e['_label']}: discover_from: entry {e['discover_from']!r} has {len(pool)} runs matching "
                         f"seed {settings['seed']} and strength {settings['data']['strength']} "
                         f"({[r.run_id for r in pool]}); expected exactly one")
    return pool[0]


def _make_run(name: str, index: int, method: str, settings: dict[str, Any], deps: list[str], tags: list[str],
              label: list[str]) -> PlanRun:
    h = settings_hash(settings)
    run_id = "-".join([name, *label, h[:10]])
    return PlanRun(run_id=run_id, entry=name, index=index, method=method, settings=settings, settings_hash=h,
                   depends_on=deps, tags=tags, label=label)


# ------------------------------------------------------------------------------------------------- running


@dataclass
class RunReport:
    """One run's outcome: ``status`` ``"done"`` (run now), ``"skipped"`` (already done) or ``"failed"`` (with its
    ``error``)."""

    run_id: str
    status: str
    seconds: float = 0.0
    error: str | None = None

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.run_id}: skipped (already done)"
        if self.status == "failed":
            return f"{self.run_id}: failed ({self.error})"
        return f"{self.run_id}: done ({self.seconds:.1f} s)"


@dataclass
class PlanSummary:
    """What :func:`run_plan` did: the run ids ``done`` now, ``skipped`` (done before), ``failed`` ``[(run_id,
    error)]``, the ``manifest`` written, the per-run ``reports`` and the wall time."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None
    reports: list[RunReport] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        """The summary line: runs done / skipped / failed (with reasons), the manifest, the time."""
        n = len(self.done) + len(self.skipped) + len(self.failed)
        text = (f"{n} run{'s' if n != 1 else ''}: {len(self.done)} done, {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed; {self.seconds:.1f} s")
        if self.manifest is not None:
            text += f"; manifest: {self.manifest}"
        if self.failed:
            text += "; failures: " + "; ".join(f"{r}: {err}" for r, err in self.failed)
        return text


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _plain(obj: Any) -> Any:
    """``obj`` as strict JSON values: non-finite floats become None, tensors / arrays lists, other objects str."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _plain(obj.tolist())
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    from vlmfast._cache import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(_plain(obj), indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def run_done(folder: str | os.PathLike, run: PlanRun) -> bool:
    """Whether ``folder/DONE`` marks ``run`` as finished (same settings hash)."""
    marker = Path(folder) / "DONE"
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(info, dict) and info.get("settings_hash") == run.settings_hash


class _Context:
    """The shared state of a plan run: the base model (loaded once, on first use), the output folder, options."""

    def __init__(self, plan: Plan, out: Path, device: Any, bars: bool) -> None:
        self.plan, self.out, self.bars = plan, out, bars
        self.device = device if device is not None else plan.device
        self._base = None

    @property
    def progress(self) -> bool | None:
        return None if self.bars else False

    @property
    def base(self) -> Any:
        if self._base is None:
            import torch

            from vlmfast.models import create_model, pretrain_base
            from vlmfast.models.factory import resolve_device

            if self.plan.model == "base":
                model, _ = pretrain_base(config=self.plan.base_config, preset=self.plan.base_preset,
                                         device=self.device, progress=self.progress)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.plan.model_seed)
                    model = create_model(self.plan.model, device=resolve_device(self.device))
            self._base = model.eval()
        return self._base

    def base_checkpoint(self) -> Path:
        """A random-init base saved once under the output (the manifest's file for ``zs`` and prompt backbones)."""
        from vlmfast.models import save_checkpoint
        from vlmfast.models.checkpoint import checkpoint_paths

        h = settings_hash(self.plan.model_spec)[:10]
        stem = self.out / f"base-{h}" / "model"
        if not checkpoint_paths(stem)[1].is_file():
            save_checkpoint(self.base, stem, {"method": "random-init", "init_seed": self.plan.model_seed,
                                              "config": self.plan.model})
        return checkpoint_paths(stem)[0]


def _train_data(run: PlanRun):
    from vlmfast.data import spurious_mnist

    d = run.settings["data"]
    return spurious_mnist("train", n=d["train_n"], strength=d["strength"], seed=run.seed)


def _engine(ctx: _Context, folder: Path) -> dict[str, Any]:
    every = ctx.plan.checkpoint_every
    return {"checkpoint_dir": folder / "train", "checkpoint_every": every}


def _run_robust(run: PlanRun, folder: Path, ctx: _Context) -> dict[str, Any]:
    from vlmfast.data import CLASSNAMES
    from vlmfast.tuning import robust as R

    hp = dict(run.settings["hparams"])
    hp.setdefault("batch_size", 128)
    if "grad_clip" not in hp:
        hp["grad_clip"] = "default"
    res = R.fit(ctx.base, _train_data(run), run.method, classnames=list(CLASSNAMES), seed=run.seed,
                progress=ctx.progress, **_engine(ctx, folder), **hp)
    res.save(folder / "model")
    return {"hparams": res.hparams, "train": {k: v for k, v in res.train_log.items() if k != "history"}}


def _source_folder(ctx: _Context, run_id: str) -> Path:
    return ctx.out / run_id / "model"


def _run_wise(run: PlanRun, folder: Path, ctx: _Context) -> dict[str, Any]:
    import copy

    from vlmfast.tuning import robust as R

    src = run.settings["from"]
    model, clf, card = R.load_robust(_source_folder(ctx, src), device=next(ctx.base.parameters()).device)
    classnames, templates = list(card["classnames"]), list(card["templates"])
    zs = R.zero_shot_classifier(ctx.base, classnames, templates)
    if zs.normalize != clf.normalize:
        raise ValueError(f"from: {src} has a head on raw features (LP / LP-FT); WiSE-FT needs normalized ones")
    alpha = float(run.settings["alpha"])
    wise_model = R.interpolate_(copy.deepcopy(model), ctx.base.state_dict(), model.state_dict(), alpha)
    work = R.ImageClassifier(wise_model.visual, clf.head.weight.detach().clone(), clf.head.bias.detach().clone(),
                             normalize=clf.normalize)
    R.interpolate_(work, zs.state_dict(), clf.state_dict(), alpha)
    hparams = {"method": "wise-ft", "alpha": alpha, "from": src,
               "from_method": (card.get("hparams") or {}).get("method")}
    res = R.RobustResult(method="wise-ft", model=wise_model.eval(), classifier=work.eval(), zero_shot=zs,
                         classnames=classnames, templates=templates, hparams=hparams,
                         train_log={"interpolated": f"(1 - {alpha}) zero-shot + {alpha} {src}"})
    res.save(folder / "model")
    return {"hparams": hparams}


def _stage1_from_folder(disc: Path, ctx: _Context):
    """``(stage-1 CLIP, medoid embeddings, spurious ids)`` of a ``vlmfast audit spurious`` output folder."""
    from safetensors.torch import load_file

    from vlmfast.fleet.manifest import ManifestEntry, load_entry

    info = json.loads((disc / "results.json").read_text())
    if not info.get("found"):
        raise ValueError(f"discovery: {disc} found no spurious cluster; nothing to mitigate")
    med = load_file(str(disc / "medoids.safetensors"))
    spec = str(info.get("model", ""))
    if spec == "base" or spec.startswith("base:"):
        entry = ManifestEntry("stage1", spec, "base", preset=str(info.get("base_preset", "test")))
    elif Path(spec).is_dir() or Path(spec).with_suffix(".safetensors").is_file() or Path(spec).is_file():
        entry = ManifestEntry("stage1", spec, "clip")
    else:
        raise ValueError(f"discovery: the model of {disc} ({spec!r}) is neither 'base', a finetune folder nor a "
                         f"checkpoint (a random-init model cannot be reloaded)")
    stage1 = load_entry(entry, device=next(ctx.base.parameters()).device, progress=ctx.progress).clip
    return stage1, med["medoid_embeddings"], med["spurious_ids"].tolist()[:1]


def _run_ravl(run: PlanRun, folder: Path, ctx: _Context) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from vlmfast.data import CLASSNAMES, spurious_mnist
    from vlmfast.tuning import region as TR
    from vlmfast.tuning import robust as R

    disc = run.settings["discovery"]
    train = _train_data(run)
    found: dict[str, Any] = {}
    if "from" in disc:
        from vlmfast.audit.spurious import discover

        stage1, _, _ = R.load_robust(_source_folder(ctx, disc["from"]), device=next(ctx.base.parameters()).device)
        data = spurious_mnist("test", n=disc["discovery_n"], seed=disc["discovery_seed"])
        ks = disc["discovery_ks"]
        res = discover(stage1.eval(), data, list(CLASSNAMES), ks=None if ks is None else range(ks[0], ks[1]),
                       threshold=disc["discovery_threshold"], seed=disc["discovery_seed"], progress=bool(ctx.bars))
        found = {"from": disc["from"], "k": res.k, "found": res.found, "summary": res.summary(),
                 "spurious_ids": res.spurious_ids, "notes": res.notes}
        if res.medoid_embeddings is not None:
            (folder / "discovery").mkdir(parents=True, exist_ok=True)
            save_file({"medoid_embeddings": torch.from_numpy(np.ascontiguousarray(res.medoid_embeddings)),
                       "spurious_ids": torch.tensor(res.spurious_ids, dtype=torch.int64)},
                      str(folder / "discovery" / "medoids.safetensors"))
        _write_json(folder / "discovery" / "results.json", found)
        if not res.found:
            raise ValueError(f"discover_from: the discovery on {disc['from']} found no spurious cluster "
                             f"({'; '.join(res.notes) or 'none passed the filter'}); nothing to mitigate")
        medoids, ids = res.medoid_embeddings, res.spurious_ids[:1]
    else:
        stage1, medoids, ids = _stage1_from_folder(Path(disc["path"]), ctx)
        found = {"folder": disc["path"], "spurious_ids": ids}
    split = TR.split_regions(stage1, train, medoids, ids)
    hp = dict(run.settings["hparams"])
    hp.setdefault("batch_size", 128)
    hp["lr"] = 1e-4 if hp.get("lr") is None else hp["lr"]
    if isinstance(hp.get("warmup"), float):  # region.fit takes steps: a fraction of them
        hp["warmup"] = max(0, min(int(round(hp["warmup"] * hp["steps"])), hp["steps"] - 1))
    res = TR.fit(ctx.base, train, split=split, classnames=list(CLASSNAMES), seed=run.seed, progress=ctx.progress,
                 **_engine(ctx, folder), **hp)
    res.save(folder / "model")
    return {"hparams": res.hparams, "discovery": found, "split": split.summary(),
            "train": {k: v for k, v in res.train_log.items() if k != "history"}}


def _run_prompt(run: PlanRun, folder: Path, ctx: _Context) -> dict[str, Any]:
    import copy

    import torch

    from vlmfast.data import CLASSNAMES
    from vlmfast.tuning import base_to_new_split, fit

    hp = dict(run.settings["hparams"])
    dor = hp.pop("dor", False)
    hp.setdefault("batch_size", 32)
    hp.setdefault("shots", 16)
    hp["lr"] = 0.002 if hp.get("lr") is None else hp["lr"]
    if "position" in hp:
        hp["class_token_position"] = hp.pop("position")
    if ctx.plan.model != "base":
        ctx.base_checkpoint()  # the manifest's backbone file
    base_ids, new_ids = base_to_new_split(CLASSNAMES)
    base_names, new_names = [CLASSNAMES[i] for i in base_ids], [CLASSNAMES[i] for i in new_ids]
    train = _train_data(run)
    train = train.subset(torch.nonzero(torch.as_tensor(train.labels) < len(base_ids)).flatten())
    # the learner freezes the model it is built on: give it a copy, so the base stays trainable for the next runs
    learner = fit(copy.deepcopy(ctx.base), train, base_names, run.method, dor, seed=run.seed, new_classnames=new_names,
                  progress=ctx.progress, **_engine(ctx, folder), **hp)
    learner.save(folder / "learner", extra={"data": {"train": "spurious_mnist(train, strength=0)",
                                                     "train_n": run.settings["data"]["train_n"],
                                                     "base": base_names, "new": new_names},
                                            "plan_run": run.run_id})
    return {"hparams": learner.hparams, "train": {k: v for k, v in learner.train_log.items() if k != "history"}}


def _execute(run: PlanRun, folder: Path, ctx: _Context) -> dict[str, Any]:
    if run.method in ROBUST_METHODS:
        return _run_robust(run, folder, ctx)
    if run.method == "wise-ft":
        return _run_wise(run, folder, ctx)
    if run.method == "ravl":
        return _run_ravl(run, folder, ctx)
    if run.method in PROMPT_METHODS:
        return _run_prompt(run, folder, ctx)
    if run.method == "zs":
        if ctx.plan.model != "base":
            return {"checkpoint": str(ctx.base_checkpoint())}
        return {}
    raise ValueError(f"method: expected one of {METHODS}, got {run.method!r}")  # pragma: no cover


def _clear(folder: Path) -> None:
    """Remove a run folder's outputs of an unfinished attempt; the engine's checkpoints (``train/``) stay."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name == "train":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def manifest_entry(run: PlanRun, plan: Plan, out: str | os.PathLike) -> dict[str, Any]:
    """The manifest entry (a dict for :func:`vlmfast.fleet.write_manifest`, paths relative to ``out``) of a
    finished run."""
    data = run.settings.get("data", {})
    meta = {"run_id": run.run_id, "entry": run.entry, "settings_hash": run.settings_hash}
    meta.update({k: v for k, v in data.items()})
    if run.method == "wise-ft":
        meta.update(alpha=run.settings["alpha"], source=run.settings["from"])
    method = run.method + ("+dor" if run.settings.get("hparams", {}).get("dor") else "")
    if run.method == "zs":
        method = "zero-shot"
    d: dict[str, Any] = {"name": run.run_id, "method": method, "tags": list(run.tags), "meta": meta}
    if run.seed is not None and run.method != "zs":
        d["seed"] = run.seed
    base_spec = "base" if plan.base_config == "vlmfast-tiny-rn" else f"base:{plan.base_config}"
    rel_base = f"base-{settings_hash(plan.model_spec)[:10]}/model.safetensors"
    if run.method == "zs":
        if plan.model == "base":
            d.update(path=base_spec, kind="base", preset=plan.base_preset)
        else:
            d.update(path=rel_base, kind="clip")
    elif run.method in PROMPT_METHODS:
        d.update(path=f"{run.run_id}/learner", kind="prompt")
        if plan.model == "base":
            d.update(backbone=base_spec, preset=plan.base_preset)
        else:
            d.update(backbone=rel_base)
    else:
        d.update(path=f"{run.run_id}/model", kind="classifier")
    return d


def _select(plan: Plan, only: Iterable[str] | None) -> set[str]:
    ids = {r.run_id for r in plan.runs}
    if only is None:
        return ids
    if isinstance(only, str):
        only = [s.strip() for s in only.split(",") if s.strip()]
    chosen: set[str] = set()
    entries = {r.entry for r in plan.runs}
    for o in only:
        if o in ids:
            chosen.add(o)
        elif o in entries:
            chosen.update(r.run_id for r in plan.runs if r.entry == o)
        else:
            raise ValueError(f"only: expected run ids or entry names of the plan, got {o!r} (entries: "
                             f"{sorted(entries)})")
    by_id = {r.run_id: r for r in plan.runs}
    stack = list(chosen)
    while stack:  # dependencies come along
        for d in by_id[stack.pop()].depends_on:
            if d not in chosen:
                chosen.add(d)
                stack.append(d)
    return chosen


def _report_fn(progress: Any) -> Callable[[RunReport], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda r: print(r.line(), file=sys.stderr, flush=True)
    return lambda r: None


def run_plan(plan: Plan | str | os.PathLike, out: str | os.PathLike, *,
             progress: bool | Callable[[RunReport], None] | None = None, only: Iterable[str] | None = None,
             bars: bool = False, device: Any = None) -> PlanSummary:
    """Run every run of ``plan`` (a :class:`Plan` or a ``plan.yaml`` path) into ``out`` (module docs): skip the
    runs whose ``DONE`` matches, redo the others, record failures and go on; then write ``<out>/manifest.yaml``
    (every finished run) and ``<out>/failures.json`` (this call's failures). The manifest and failures are written
    even when the plan is interrupted (``KeyboardInterrupt`` is re-raised).

    ``progress``: a callable given each run's :class:`RunReport`, True to print its line on stderr, None/False for
    nothing. ``only``: run ids or entry names (or a comma-separated str) to run, with the runs they depend on; the
    manifest still lists every finished run of the plan. ``bars``: the training progress bars. ``device``: where
    the models train (default the plan's ``device``, else CUDA when available)."""
    from vlmfast.fleet.manifest import write_manifest

    t_start = time.perf_counter()
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan: expected a Plan or a plan.yaml path, got {type(plan).__name__}")
    if not str(out).strip():
        raise ValueError(f"out: expected a folder, got {str(out)!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a folder, got the file {str(out)!r}")
    selected = _select(plan, only)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(plan, out, device, bars)
    report = _report_fn(progress)
    summary = PlanSummary()
    failures: list[dict[str, Any]] = []
    unfinished: set[str] = set()
    try:
        for run in plan.runs:
            if run.run_id not in selected:
                continue
            folder = out / run.run_id
            t0 = time.perf_counter()
            if run_done(folder, run):
                rep = RunReport(run.run_id, "skipped")
                summary.skipped.append(run.run_id)
                summary.reports.append(rep)
                report(rep)
                if not plan.keep_checkpoints and (folder / "train").is_dir():
                    shutil.rmtree(folder / "train", ignore_errors=True)
                continue
            try:
                missing = [d for d in run.depends_on if d in unfinished or not run_done(out / d, plan.run(d))]
                if missing:
                    raise RuntimeError(f"depends on {missing[0]}, which did not finish")
                _clear(folder)
                folder.mkdir(parents=True, exist_ok=True)
                info = _execute(run, folder, ctx)
                seconds = time.perf_counter() - t0
                _write_json(folder / "run.json", {"run_id": run.run_id, "entry": run.entry, "method": run.method,
                                                  "settings": run.settings, "settings_hash": run.settings_hash,
                                                  "depends_on": run.depends_on, "seconds": seconds, **info})
                _write_json(folder / "DONE", {"run_id": run.run_id, "settings_hash": run.settings_hash,
                                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "seconds": seconds})
            except Exception as e:
                unfinished.add(run.run_id)
                rep = RunReport(run.run_id, "failed", time.perf_counter() - t0, _error_text(e))
                summary.failed.append((run.run_id, rep.error))
                failures.append({"run_id": run.run_id, "entry": run.entry, "method": run.method, "error": rep.error,
                                 "traceback": traceback.format_exc()})
                summary.reports.append(rep)
                report(rep)
                continue
            if not plan.keep_checkpoints and (folder / "train").is_dir():
                shutil.rmtree(folder / "train", ignore_errors=True)
            rep = RunReport(run.run_id, "done", seconds)
            summary.done.append(run.run_id)
            summary.reports.append(rep)
            report(rep)
    finally:
        finished = [r for r in plan.runs if run_done(out / r.run_id, r)]
        if finished:
            summary.manifest = write_manifest([manifest_entry(r, plan, out) for r in finished], out / "manifest.yaml")
        _write_json(out / "failures.json", {"plan": None if plan.path is None else str(plan.path),
                                            "failures": failures})
        summary.seconds = time.perf_counter() - t_start
    return summary
