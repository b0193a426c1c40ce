"""``vlmfast finetune --plan``: every run of a fine-tuning plan (methods x hyper-parameters x seeds x data
variants; :mod:`vlmfast.fleet.plan`) into its own folder under ``--out``, resumable, then ``<out>/manifest.yaml``
for ``vlmfast audit --manifest``.

    vlmfast finetune --plan plan.yaml --out runs/ [--only RUN_OR_ENTRY,...] [--device D] [--no-progress]

One line per run on stdout as it ends (done, skipped because its ``DONE`` marker matches, or failed and why), then
the summary line (runs done / skipped / failed with reasons, the manifest). Exit status 0, or 1 when a run failed
(its error and traceback are in ``<out>/failures.json``; the other runs finished). User errors (an invalid plan,
``--method`` or another single-run option together with ``--plan``) are one line on stderr and exit 2.
``--no-progress`` turns off the training progress bars (stderr); without it they show when stderr is a terminal.
"""

from __future__ import annotations

import argparse

#: ``vlmfast finetune`` options of a single run that a plan sets per entry instead (dest -> default).
SINGLE_RUN_OPTIONS = {"method": None, "dor": False, "shots": 16, "steps": 200, "batch_size": None, "lr": None,
                      "n_ctx": None, "ctx_init": None, "dor_k": 5000, "dor_lam": None, "train_n": 2000,
                      "strength": None, "discovery": None, "wise": False, "model": "base", "base_preset": "test",
                      "seed": 0, "lam": 0.8, "position": "end", "severity": 3, "test_n": 1000}


def run_plan_cli(args: argparse.Namespace) -> int:
    """Run ``args.plan`` into ``args.out`` (module docs); returns the exit status."""
    from vlmfast.cli import UsageError
    from vlmfast.fleet.plan import load_plan, run_plan

    given = [k for k, default in SINGLE_RUN_OPTIONS.items() if getattr(args, k, default) != default]
    if given:
        raise UsageError("vlmfast finetune", f"--plan: the plan sets the methods and their settings; drop "
                                             f"--{given[0].replace('_', '-')}")
    if not str(args.out).strip():
        raise ValueError(f"--out: expected a folder, got {args.out!r}")
    plan = load_plan(args.plan)  # validated before anything runs
    only = None
    if getattr(args, "only", None) is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        known = {r.run_id for r in plan.runs} | {r.entry for r in plan.runs}
        for o in only or [args.only]:
            if o not in known:
                raise ValueError(f"--only: expected run ids or entry names of the plan, got {o!r} (entries: "
                                 f"{sorted({r.entry for r in plan.runs})})")
    from vlmfast.cli._progress import Progress

    n = len(plan.runs) if only is None else None
    with Progress(enabled=False if args.no_progress else None) as prog:
        bar = prog.stage("fine-tuning", n)
        summary = run_plan(plan, args.out, progress=lambda r: bar.advance(r.line()), only=only,
                           bars=not args.no_progress and not prog.bars, device=args.device)
    print(f"summary: {summary.line()}")
    return 1 if summary.failed else 0


__all__ = ["run_plan_cli"]
