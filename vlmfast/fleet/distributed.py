"""The fleet audit sharded over Ray: :func:`audit_fleet_ray` gives the same store as :func:`vlmfast.fleet.audit_fleet`
(same units, keys, settings and rows), with the models' audits running as Ray tasks.

* **Driver** (this process): validates the audits, resolves their settings, builds and fingerprints the splits
  once (they go into Ray's object store once, ``ray.put``), hashes every checkpoint and looks its units up in the
  store — exactly as the in-process runner does. Every model with a unit left becomes one task, except prompt
  learners that share a backbone: those are audited together on the driver after the tasks
  (:func:`vlmfast.fleet.runner.grouped_calibration_rows`: one backbone load and encode for the whole group).
* **Tasks** (one per model; ``num_gpus=1`` each when the cluster has GPUs, else ``num_cpus``): load the model from
  its manifest entry (safetensors / ``pretrain_base``'s cache; nothing is unpickled from disk), run its pending
  audits on the shared splits and return the rows. A task never touches the store.
* **Results** are written by the driver as tasks finish (``ray.wait``), each unit in its own transaction with its
  ``done`` marker, so a killed run resumes exactly as the in-process one; failures (load or audit) are recorded and
  the rest go on.

Ray is the ``[distributed]`` extra: ``address=None`` starts a local cluster (``ray.init`` on this machine with
``num_cpus``), an address (``"auto"``, ``"ray://host:10001"``) joins one. The CLI: ``vlmfast audit --manifest M
--ray [ADDRESS]``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping, Sequence

from vlmfast._optional import require
from vlmfast.fleet.manifest import ManifestEntry, load_entry, load_manifest
from vlmfast.fleet.runner import (AUDITS, DEFAULT_SPLITS, FleetSummary, ModelReport, RunOptions, _error_text,
                                  _prepare, build_splits, check_audits, model_card, prompt_groups,
                                  split_output)
from vlmfast.fleet.store import AuditStore

__all__ = ["audit_fleet_ray"]


def _run_units(entry: ManifestEntry, todo: list[tuple[str, str]], splits: Mapping[str, Any],
               resolved: Mapping[str, Mapping[str, Any]], options: RunOptions, device: Any) -> list[tuple]:
    """The task body: ``[(audit, split, (rows, artifacts) or None, seconds, error or None)]``; a load failure is
    one ``("load", None, None, 0, error)`` entry."""
    try:
        loaded = load_entry(entry, device=device, progress=False)
    except Exception as e:  # recorded by the driver
        return [("load", None, None, 0.0, _error_text(e))]
    out = []
    for a, name in todo:
        spec = AUDITS[a]
        target = loaded.clip if spec.target == "clip" else loaded.audited
        t0 = time.perf_counter()
        try:
            out.append((a, name, split_output(spec.fn(target, splits[name], resolved[a], options)),
                        time.perf_counter() - t0, None))
        except Exception as e:
            out.append((a, name, None, time.perf_counter() - t0, _error_text(e)))
    return out


def audit_fleet_ray(
    manifest: str | os.PathLike | Iterable[ManifestEntry],
    audits: Sequence[str] = ("calibration",),
    db: str | os.PathLike | AuditStore = "audit.sqlite",
    splits: Sequence[str] | Mapping[str, Any] = DEFAULT_SPLITS,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    n: int = 1000,
    seed: int = 0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    progress: bool | Any = None,
    device: Any = None,
    batch_size: int = 64,
    cpus_per_task: int = 1,
    artifacts: bool = True,
) -> FleetSummary:
    """:func:`vlmfast.fleet.audit_fleet` with one Ray task per model (module docs). ``address``: a Ray cluster to
    join (None: start a local one with ``num_cpus``; a cluster this process already joined is reused).
    ``cpus_per_task``: CPUs each task asks for when the cluster has no GPU."""
    ray = require("ray", "vlmfast.fleet.audit_fleet_ray (--ray)")
    t_start = time.perf_counter()
    audits, resolved, skeys = check_audits(audits, settings, device)
    if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise ValueError(f"cpus_per_task: expected an int >= 1, got {cpus_per_task!r}")
    entries = load_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    for i, e in enumerate(entries):
        if not isinstance(e, ManifestEntry):
            raise TypeError(f"manifest: expected a manifest path or ManifestEntry objects, got {type(e).__name__} "
                            f"at [{i}]")
    split_map = build_splits(splits, n=n, seed=seed)
    plan = {a: [s for s in split_map.values() if AUDITS[a].applies(s)] for a in audits}
    summary = FleetSummary()
    for a, ss in plan.items():
        if not ss:
            summary.notes.append(f"{a}: applies to none of the splits {list(split_map)} (skipped)")
    report = (progress if callable(progress) else
              (lambda r: print(r.line(), flush=True)) if progress else (lambda r: None))
    options = RunOptions(batch_size=batch_size, progress=False, artifacts=bool(artifacts))
    store = db if isinstance(db, AuditStore) else AuditStore(db)
    started_here = False
    try:
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kw["num_cpus"] = num_cpus
            ray.init(address=address, **kw)
            started_here = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(_run_units).options(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cpus_per_task)
        splits_ref = ray.put(split_map)
        pending: dict[Any, tuple[ManifestEntry, ModelReport, str, float]] = {}

        def fail(rep: ModelReport, key: str | None, audit: str, err: str, entry: ManifestEntry) -> None:
            rep.status = "failed"
            rep.errors.append((audit, err))
            store.record_failure(key, audit, RuntimeError(err), name=entry.name,
                                 path=str(entry.resolved or entry.path))
            summary.failed.append((entry.name, audit, err))

        # prompt heads sharing a backbone: one in-process group on the driver (one encode, one calibration pass)
        # beats one Ray task per head, each loading and encoding again
        groups = prompt_groups(entries) if "calibration" in audits else {}
        grouped = {i for idx in groups.values() for i in idx}
        for entry in [e for i, e in enumerate(entries) if i not in grouped]:
            t0 = time.perf_counter()
            rep = ModelReport(entry.name, "done")
            try:
                key, parts, _ = _prepare(entry, None if device is None else device, False)
            except Exception as e:
                fail(rep, None, "load", _error_text(e), entry)
                rep.seconds = time.perf_counter() - t0
                report(rep)
                continue
            rep.model_key = key
            store.add_model(key, entry.name, str(entry.resolved or entry.path), model_card(entry, parts))
            todo = []
            for a in audits:
                if entry.kind not in AUDITS[a].kinds:
                    continue
                for s in plan[a]:
                    if not force and store.has(key, a, s.fingerprint, skeys[a]):
                        rep.reused += 1
                    else:
                        todo.append((a, s.name))
            summary.reused += rep.reused
            if not todo:
                rep.status, rep.seconds = "skipped", time.perf_counter() - t0
                summary.skipped += 1
                report(rep)
                continue
            ref = task.remote(entry, todo, splits_ref, resolved, options, device)
            pending[ref] = (entry, rep, key, t0)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            entry, rep, key, t0 = pending.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except Exception as e:  # the task itself died (worker crash)
                results = [("load", None, None, 0.0, _error_text(e))]
            for a, name, output, secs, err in results:
                if err is not None:
                    fail(rep, key, a, err, entry)
                    continue
                rows, arts = output
                s = split_map[name]
                try:
                    bad = [r for r in rows if len(r) != 3 or r[0] != s.name]
                    if bad:
                        raise ValueError(f"audit {a!r}: expected rows (split, metric, value) of split {s.name!r}, "
                                         f"got {bad[0]!r:.80}")
                    store.write(key, a, s.fingerprint, resolved[a], rows, seconds=secs, split_info={s.name: s.info},
                                artifacts=arts)
                except Exception as e:
                    fail(rep, key, a, _error_text(e), entry)
                    continue
                rep.computed.append((a, name))
                summary.computed += 1
            rep.seconds = time.perf_counter() - t0
            if rep.status == "done":
                summary.done += 1
            report(rep)
        if grouped:
            from vlmfast.fleet.runner import audit_fleet

            g = audit_fleet([entries[i] for i in sorted(grouped)], ["calibration"], store, split_map,
                            settings={k: v for k, v in (settings or {}).items() if k == "calibration"}, force=force,
                            progress=report, device=device, batch_size=batch_size, artifacts=artifacts)
            summary.done += g.done
            summary.skipped += g.skipped
            summary.failed += g.failed
            summary.computed += g.computed
            summary.reused += g.reused
    finally:
        if started_here:
            ray.shutdown()
        if not isinstance(db, AuditStore):
            store.close()
    summary.seconds = time.perf_counter() - t_start
    return summary
