"""Benchmark: the fleet audit's throughput — models per minute for a fleet of tiny CLIP checkpoints audited into a
fresh SQLite store, in-process (:func:`vlmfast.fleet.audit_fleet`) against Ray (:func:`vlmfast.fleet.audit_fleet_ray`,
a local cluster, one task per model), and a second run of the same fleet (everything reused: the cost of hashing
the checkpoints and looking their units up).

Fleet: ``models`` random-init checkpoints (alternating ``vlmfast-tiny-rn`` / ``vlmfast-tiny-vit``, saved with
:func:`vlmfast.models.save_checkpoint`), audits ``audits`` on the splits ``id`` and ``sklearn-digits`` of ``n``
images each (built once per run, as the runner does). ``median_ms`` is one whole fleet run; models/min in the notes.
``speedup_vs_ref`` / ``speedup_vs_peer`` are against the in-process run (there is no peer fleet runner). Ray's
cluster is started once, before timing (its start-up, ~5-60 s on 2 cores, is reported in the notes). The stores of
the in-process and Ray runs are compared before anything is reported.

    python benchmarks/bench_fleet.py                     # the CPU configs
    python benchmarks/bench_fleet.py --config quick      # seconds; what the test suite runs (no Ray)
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(models=2, n=40, audits=("calibration",), device="cpu", ray=False, reps=1),
    "cpu-12-calibration": dict(models=12, n=1000, audits=("calibration",), device="cpu", ray=True, reps=2),
    "cpu-6-three-audits": dict(models=6, n=200, audits=("calibration", "rationality", "spurious"), device="cpu",
                               ray=True, reps=1),
    # the target: 100 tiny full models x 3 audits in under 10 minutes on 2 cores (in-process)
    "cpu-100-three-audits": dict(models=100, n=200, audits=("calibration", "rationality", "spurious"), device="cpu",
                                 ray=False, reps=1),
    # prompt-tuned heads sharing one backbone: grouped (encode once, all heads in one calibration pass) against the
    # one-by-one path, timed on its first `ref_heads` heads and scaled to the fleet
    "quick-heads": dict(heads=8, ref_heads=2, n=200, device="cpu", reps=1),
    "cpu-1000-prompt-heads": dict(heads=1000, ref_heads=10, n=10_000, device="cpu", reps=1),
}
SETTINGS = {"spurious": {"ks": [20, 24]}}


def _heads(root: Path, m: int):
    """``m`` CoOp learners (the same 4-token context, perturbed per head; trained on the base half) on one random-init
    ``vlmfast-tiny-rn`` checkpoint."""
    from vlmfast.data import CLASSNAMES
    from vlmfast.fleet import ManifestEntry
    from vlmfast.models import create_model, save_checkpoint
    from vlmfast.tuning.prompt import PromptLearner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("vlmfast-tiny-rn", device="cpu").eval()
        save_checkpoint(model, root / "backbone", {"method": "random"})
        learner = PromptLearner(model, list(CLASSNAMES[:5]), method="coop", n_ctx=4)
        init = learner.ctx.detach().clone()
        entries = []
        for i in range(m):
            with torch.no_grad():
                learner.ctx.copy_(init + 0.5 * torch.randn_like(init))
            learner.save(root / f"h{i}" / "learner")
            entries.append(ManifestEntry(name=f"h{i}", path=f"h{i}/learner", kind="prompt", method="coop", seed=i,
                                         backbone="backbone", root=root))
    return entries


def run_heads(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    from vlmfast.fleet import audit_fleet, build_splits

    reps = reps or cfg["reps"]
    m, k = cfg["heads"], cfg["ref_heads"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    entries = _heads(tmp / "zoo", m)
    splits = build_splits(("id",), n=cfg["n"], seed=0)
    counter = iter(range(10_000))

    def fresh(fleet, grouped):
        def call():
            db = tmp / f"run{next(counter)}.sqlite"
            s = audit_fleet(fleet, ["calibration"], db, splits, device="cpu", group_prompts=grouped)
            assert s.done == len(fleet) and not s.failed, s.line()
            call.last = db
        return call

    grouped = fresh(entries, True)
    timings = {"grouped": _runner.time_fn(grouped, "cpu", reps=reps, warmup=0, max_seconds=600)}
    one = fresh(entries[:k], False)
    t = _runner.time_fn(one, "cpu", reps=1, warmup=0, max_seconds=600)
    scale = m / k
    timings["one by one"] = _runner.Timing(t.median * scale, t.p20 * scale, t.p80 * scale, t.reps)
    a, b = (_rows(db, ["calibration"])["calibration"] for db in (grouped.last, one.last))
    keys = {r["model_key"] for r in b}
    same = _compare({"calibration": [r for r in a if r["model_key"] in keys]}, {"calibration": b})
    notes = {"grouped": f"{m / (timings['grouped'].median / 6e4):.0f} heads/min; vs one by one on the first {k} "
                        f"heads: {same}",
             "one by one": f"timed on {k} heads ({t.median / 1e3:.1f} s), scaled x{scale:g}; "
                           f"{m / (timings['one by one'].median / 6e4):.1f} heads/min"}
    _runner.report("fleet", f"{name}: {m} prompt heads on one vlmfast-tiny-rn x calibration x {cfg['n']} images",
                   "cpu", timings, ref="one by one", peer="one by one", notes=notes,
                   extra_note="random-init backbone, CoOp contexts perturbed per head; no peer fleet runner exists",
                   record=record)


def _fleet(root: Path, m: int):
    from vlmfast.fleet import ManifestEntry
    from vlmfast.models import create_model, save_checkpoint

    entries = []
    for i in range(m):
        config = ("vlmfast-tiny-rn", "vlmfast-tiny-vit")[i % 2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            model = create_model(config, device="cpu").eval()
        save_checkpoint(model, root / f"m{i}", {"method": "random"})
        entries.append(ManifestEntry(name=f"m{i}", path=f"m{i}", kind="clip", method=config, seed=i, root=root))
    return entries


def _rows(db, audits):
    from vlmfast.fleet import AuditStore

    with AuditStore(db) as st:
        return {a: [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()
                     if k not in ("seconds", "finished_at")} for r in st.results(a)] for a in audits}


def _compare(a: dict, b: dict) -> str:
    """How two stores' results compare: equal, or the largest relative difference per audit (Ray workers run torch
    on one thread, the driver on all: reductions round differently; k-medoids on near-degenerate random-init
    embeddings can then choose another clustering)."""
    if a == b:
        return "equal"
    out = []
    for audit in a:
        rb = {(r["model_key"], r["split"], r["metric"]): r["value"] for r in b[audit]}
        worst = 0.0
        for r in a[audit]:
            x, y = r["value"], rb.get((r["model_key"], r["split"], r["metric"]))
            if x == y:
                continue
            if x is None or y is None:
                worst = math.inf
                continue
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
        if worst:
            out.append(f"{audit} max rel diff {worst:.1e}")
    return "differs: " + ", ".join(out)


def run(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    from vlmfast.fleet import audit_fleet, audit_fleet_ray, build_splits

    reps = reps or cfg["reps"]
    m, audits = cfg["models"], list(cfg["audits"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    entries = _fleet(tmp / "zoo", m)
    splits = build_splits(("id", "sklearn-digits"), n=cfg["n"], seed=0)
    counter = iter(range(10_000))

    def fresh(fn):
        def call():
            db = tmp / f"run{next(counter)}.sqlite"
            s = fn(db)
            assert s.done == m and not s.failed, s.line()
            call.last = db
        return call

    kw = dict(settings=SETTINGS, device="cpu")
    timings, notes = {}, {}
    inproc = fresh(lambda db: audit_fleet(entries, audits, db, splits, **kw))
    timings["in-process"] = _runner.time_fn(inproc, "cpu", reps=reps, warmup=0, max_seconds=600)
    ref_db = inproc.last
    again_db = tmp / "again.sqlite"
    audit_fleet(entries, audits, again_db, splits, **kw)

    def rerun():
        s = audit_fleet(entries, audits, again_db, splits, **kw)
        assert s.skipped == m and s.computed == 0, s.line()

    timings["in-process, all reused"] = _runner.time_fn(rerun, "cpu", reps=max(reps, 3), warmup=0)
    if cfg["ray"]:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        start_s = time.perf_counter() - t0
        try:
            raycall = fresh(lambda db: audit_fleet_ray(entries, audits, db, splits, **kw))
            raycall()  # warm the workers (their first imports), then time
            same = _compare(_rows(raycall.last, audits), _rows(ref_db, audits))
            timings["ray (2 CPUs)"] = _runner.time_fn(raycall, "cpu", reps=reps, warmup=0, max_seconds=600)
            notes["ray (2 CPUs)"] = (f"cluster start {start_s:.1f} s (not timed); workers warmed; store vs "
                                     f"in-process: {same}")
        finally:
            ray.shutdown()
    for k, t in timings.items():
        per_min = m / (t.median / 6e4)
        notes[k] = "; ".join(x for x in (f"{per_min:.1f} models/min", notes.get(k, "")) if x)
    _runner.report("fleet", f"{name}: {m} models x {'+'.join(audits)} x 2 splits of {cfg['n']}", "cpu", timings,
                   ref="in-process", peer="in-process", notes=notes,
                   extra_note="random-init tiny rn/vit checkpoints; no peer fleet runner exists", record=record)


def _run(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    (run_heads if "heads" in cfg else run)(name, cfg, reps, record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, _run, skip_by_default=("quick", "quick-heads"))


if __name__ == "__main__":
    raise SystemExit(main())
