"""``vlmfast demo`` (``make demo``): the whole fleet job, offline, on the built-in data.

1. **Base.** The tiny pretrained ViT CLIP (:func:`vlmfast.models.pretrain_base` of ``vlmfast-tiny-vit``, preset
   ``test``: ~45 s on 2 CPU cores, cached under the vlmfast cache afterwards). A ViT, not the ResNet: Grad-CAM at
   64 px gives the ResNet 2 x 2 maps that never reach the rationality threshold (README, PT/IR reproduction).
2. **Fine-tune** the fleet of :data:`DEMO_PLAN` (:func:`vlmfast.fleet.run_plan`, resumable): zero-shot; LP, FT,
   FLYP and CaRot on unbiased data and with the red square planted on "nine" (Cramér's V 0.95); WiSE-FT (alpha 0.5)
   of every FLYP run; RaVL mitigation of each shortcut FLYP model (its discovery runs inside the run); CoOp,
   CoCoOp and KgCoOp, each with and without DOR; two seeds each — 35 runs, into ``OUT/runs``.
3. **Audit** all of them (:func:`vlmfast.fleet.audit_fleet`) into ``OUT/audit.sqlite``: calibration on the
   in-distribution composites and three shifts (scikit-learn's real 8 x 8 scans, noise and blur at severity 3);
   rationality on the in-distribution composites and the scikit-learn scans, one explainer for every model
   (all-block relevance: the README shows that mixing explainers confounds the PT/IR comparison); spurious-feature
   discovery on the in-distribution composites (squares independent of the class). A re-run computes only
   what the store lacks.
4. **Report** (:func:`vlmfast.fleet.write_report`): ``OUT/report/index.html`` (tables, per-method summary, plots
   and whether each seed paper's finding reappears, with the numbers: :mod:`vlmfast.fleet.findings`), CSV exports
   and ``findings.json``; the findings are printed too, and ``OUT/demo.json`` keeps the stage timings.

Nothing is tuned for a finding: the plan is fixed here, the checks and their rule in :mod:`vlmfast.fleet.findings`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from vlmfast.cli._common import write_json

#: The demo's fine-tuning plan (a ``plan.yaml`` as a dict; written to ``OUT/plan.yaml``). The training budget is
#: the demo's (60 steps of 64 for the full-model methods, 100 for the prompt learners): minutes on 2 CPU cores, far
#: from the papers' budgets and from the reproductions in ``benchmarks/repro_*.py``.
DEMO_PLAN: dict[str, Any] = {
    "version": 1,
    "model": "base",
    "base_config": "vlmfast-tiny-vit",
    "base_preset": "test",
    "checkpoint_every": 1000,
    "defaults": {"train_n": 1000, "seed": [0, 1]},
    "runs": [
        {"method": "zs"},
        *({"name": m, "method": m, "strength": [0.0, 0.95], "steps": 60, "batch_size": 64}
          for m in ("lp", "ft", "flyp", "carot")),
        {"name": "wise", "method": "wise-ft", "from": "flyp", "alpha": 0.5},
        {"name": "ravl", "method": "ravl", "discover_from": "flyp", "strength": 0.95, "steps": 60, "batch_size": 64,
         "discovery_n": 200},
        *({"name": m, "method": m, "dor": [False, True], "steps": 100, "shots": 8} for m in ("coop", "cocoop",
                                                                                            "kgcoop")),
    ],
}

#: The evaluation splits per audit (names of :func:`vlmfast.fleet.build_split`).
DEMO_AUDITS: dict[str, tuple[str, ...]] = {
    "calibration": ("id", "sklearn-digits", "noise-3", "blur-3"),
    "rationality": ("id", "sklearn-digits"),
    "spurious": ("id",),
}
#: The audit settings of the demo (the rest are the audits' defaults).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {"rationality": {"blocks": "all"}}


def _log(msg: str) -> None:
    print(msg, flush=True)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="the offline demo: fine-tune, audit and report a fleet (make demo)",
                       description="The whole fleet job offline on the built-in data: a tiny pretrained CLIP, 35 "
                                   "fine-tuning runs (every method, two strengths of a planted feature, two seeds), "
                                   "three audits into OUT/audit.sqlite and the report OUT/report/index.html, which "
                                   "says whether each seed paper's finding reappears.")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--n", type=int, default=500, help="images per evaluation split (default 500)")
    p.add_argument("--backend", default=None, help="force a backend for the kernels (see `vlmfast info`)")
    p.add_argument("--force", action="store_true", help="re-audit every model (the runs are reused)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vlmfast import _dispatch
    from vlmfast.cli._progress import Progress
    from vlmfast.fleet import audit_fleet, load_manifest, write_report
    from vlmfast.fleet.findings import findings_markdown
    from vlmfast.fleet.plan import plan_from_dict, run_plan

    if isinstance(args.n, bool) or not isinstance(args.n, int) or args.n < 1:
        raise ValueError(f"--n: expected a positive integer, got {args.n!r}")
    if not str(args.out).strip():
        raise ValueError(f"--out: expected a folder, got {args.out!r}")
    _dispatch.forced_backend(args.backend)  # an invalid name fails now, not after the training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_from_dict(DEMO_PLAN, where="vlmfast demo plan")
    _write_plan(out / "plan.yaml")
    times: dict[str, float] = {}
    with _forced(args.backend), Progress() as prog:
        log = prog.line
        t0 = time.perf_counter()
        log(f"1/3 fine-tuning {len(plan.runs)} runs into {out / 'runs'} (the base model is pretrained first when it "
            "is not cached) ...")
        bar = prog.stage("fine-tuning", len(plan.runs))
        runs = run_plan(plan, out / "runs", progress=lambda r: bar.advance("  " + r.line()))
        times["finetune_s"] = time.perf_counter() - t0
        log(f"  {runs.line()}")

        t0 = time.perf_counter()
        db = out / "audit.sqlite"
        log(f"2/3 auditing into {db} ...")
        manifest = out / "runs" / "manifest.yaml"
        n_models = len(load_manifest(manifest))
        summaries = []
        for audit, splits in DEMO_AUDITS.items():
            bar = prog.stage(f"audit: {audit}", n_models)
            s = audit_fleet(manifest, [audit], db, list(splits), n=args.n, seed=0,
                            settings={a: v for a, v in DEMO_SETTINGS.items() if a == audit}, force=args.force,
                            bars=prog.bars,
                            progress=lambda r, a=audit, b=bar: b.advance(f"  [{a}] {r.line()}"))
            log(f"  {audit}: {s.line()}")
            summaries.append(s)
        times["audit_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        log(f"3/3 report into {out / 'report'} ...")
        files = write_report(db, out / "report", formats=("html", "csv"))
        times["report_s"] = time.perf_counter() - t0

    findings = files.findings  # the report's, checked once on the store's numbers
    _log("\nDo the seed papers' findings reappear on this fleet? (values in percent; rule: vlmfast.fleet.findings)\n")
    _log(findings_markdown(findings))
    failed = len(runs.failed) + sum(s.n_failed for s in summaries)
    write_json(out / "demo.json", {"times": times, "runs": {"done": runs.done, "skipped": runs.skipped,
                                                            "failed": [list(f) for f in runs.failed]},
                                   "findings": [f.as_dict() for f in findings]})
    _log(f"\nwrote {files.index} ({len(files.files)} report files), {db}, {out / 'demo.json'}; "
         f"fine-tuning {times['finetune_s']:.0f} s, audits {times['audit_s']:.0f} s, report {times['report_s']:.0f} s"
         + (f"; {failed} failures (see the report)" if failed else ""))
    return 1 if failed else 0


@contextlib.contextmanager
def _forced(backend: str | None):
    """VLMFAST_BACKEND set to ``backend`` for the block (every op of the job uses it), then restored."""
    if not backend:
        yield
        return
    old = os.environ.get("VLMFAST_BACKEND")
    os.environ["VLMFAST_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLMFAST_BACKEND", None)
        else:
            os.environ["VLMFAST_BACKEND"] = old


def _write_plan(path: Path) -> None:
    from vlmfast.fleet.plan import _yaml

    text = ("# The plan `vlmfast demo` ran (vlmfast.cli.demo.DEMO_PLAN): `vlmfast finetune --plan` runs it as is.\n"
            + _yaml().safe_dump(DEMO_PLAN, sort_keys=False))
    path.write_text(text, encoding="utf-8")
