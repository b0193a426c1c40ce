"""``vlmfast audit --manifest``: the fleet audit — every model of a manifest x every audit x every split, into a
SQLite store, computing only what the store does not hold yet (:func:`vlmfast.fleet.audit_fleet`).

    vlmfast audit --manifest runs/manifest.yaml --audits calibration,rationality,spurious --db audit.sqlite
                  [--splits id,sklearn-digits] [--n 1000] [--seed 0] [--force] [--device D] [--batch-size 64]
                  [--csv results.csv] [--no-progress]

One line per model on stdout as it finishes (what was computed, skipped or failed and why), then the summary line
(models done / skipped / failed with reasons, results computed / reused). Exit status 0, or 1 when a model or an
audit failed (the failure is in the store's ``failures`` table and the others finished); user errors (a bad
option, an invalid manifest, a store of a newer schema) are one line on stderr and exit 2. On a terminal a rich
progress bar of the models runs under those lines (elapsed, remaining); elsewhere the audits' batch bars go to
stderr. ``--no-progress`` turns both off. ``--csv`` exports every stored result after the run.

Without ``--manifest`` the ``audit`` command needs one of its subcommands (``rationality``, ``spurious``); with
it, none.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

SUBCOMMANDS = "{rationality,spurious}"


def add_arguments(p: argparse.ArgumentParser, subcommands: Any = None) -> None:
    """Add the fleet options to the ``audit`` parser ``p`` (their dests start with ``fleet_``, apart from the
    subcommands' own) and make ``p`` run :func:`run` when no subcommand is given. ``subcommands``: the ``audit``
    subparsers action; each subcommand then refuses ``--manifest`` (one or the other)."""
    g = p.add_argument_group("fleet audit (--manifest, no subcommand)")
    g.add_argument("--manifest", dest="fleet_manifest", default=None, metavar="FILE",
                   help="manifest.yaml of the models to audit (runs the fleet audit)")
    g.add_argument("--audits", dest="fleet_audits", default="calibration", metavar="A,B",
                   help="comma-separated audits: calibration, rationality, spurious (default: calibration)")
    g.add_argument("--db", dest="fleet_db", default="audit.sqlite", metavar="FILE",
                   help="SQLite results store (created if absent; default: audit.sqlite)")
    g.add_argument("--splits", dest="fleet_splits", default="id,sklearn-digits", metavar="S,T",
                   help="evaluation splits: id, sklearn-digits, KIND-SEVERITY (default: id,sklearn-digits)")
    g.add_argument("--n", dest="fleet_n", type=int, default=1000, metavar="N", help="images per split (default 1000)")
    g.add_argument("--seed", dest="fleet_seed", type=int, default=0, metavar="SEED",
                   help="data seed of the splits (default 0)")
    g.add_argument("--force", dest="fleet_force", action="store_true", help="recompute results already stored")
    g.add_argument("--device", dest="fleet_device", default=None, metavar="DEVICE",
                   help="cpu / cuda (default: CUDA when available)")
    g.add_argument("--batch-size", dest="fleet_batch_size", type=int, default=64, metavar="B",
                   help="images per batch (default 64)")
    g.add_argument("--csv", dest="fleet_csv", default=None, metavar="FILE",
                   help="also export every stored result to this CSV")
    g.add_argument("--no-progress", dest="fleet_no_progress", action="store_true",
                   help="no progress bars of the audits")
    g.add_argument("--ray", dest="fleet_ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the models over Ray tasks (the [distributed] extra): no ADDRESS starts a local "
                        "cluster, or join one ('auto', 'ray://host:10001')")
    g.add_argument("--ray-cpus", dest="fleet_ray_cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray cluster (default: all)")
    p.set_defaults(run=run)
    if subcommands is not None:
        for sp in subcommands.choices.values():
            sub_run = sp.get_default("run")
            if sub_run is not None:
                sp.set_defaults(run=_without_manifest(sub_run))


def _without_manifest(sub_run):
    @functools.wraps(sub_run)
    def wrapped(args: argparse.Namespace) -> int:
        if getattr(args, "fleet_manifest", None) is not None:
            from vlmfast.cli import UsageError

            raise UsageError("vlmfast audit", f"--manifest runs the fleet audit, without a subcommand; got "
                                              f"--manifest and the subcommand {args.audit!r}")
        return sub_run(args)

    return wrapped


def _names(value: str, option: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise ValueError(f"{option}: expected comma-separated names, got {value!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from vlmfast.cli._common import output_path

    if args.fleet_manifest is None:
        from vlmfast.cli import UsageError

        raise UsageError("vlmfast audit", f"expected a subcommand {SUBCOMMANDS} or --manifest FILE (the fleet audit)")
    from pathlib import Path

    from vlmfast.fleet import AUDITS, AuditStore, audit_fleet

    audits = _names(args.fleet_audits, "--audits")
    for a in audits:
        if a not in AUDITS:
            raise ValueError(f"--audits: expected names from {', '.join(AUDITS)}, got {a!r}")
    splits = _names(args.fleet_splits, "--splits")
    low_n = 20 if "spurious" in audits else 1
    for opt, v, low in (("--n", args.fleet_n, low_n), ("--seed", args.fleet_seed, 0),
                        ("--batch-size", args.fleet_batch_size, 1)):
        if v < low:
            raise ValueError(f"{opt}: expected an int >= {low}, got {v}")
    manifest = Path(args.fleet_manifest)
    if not manifest.is_file():
        raise ValueError(f"--manifest: no such file {str(manifest)!r}")
    db = output_path(args.fleet_db, "--db")
    csv_path = output_path(args.fleet_csv, "--csv")
    from vlmfast.fleet import load_manifest

    entries = load_manifest(manifest)  # validated before the store or any split is touched
    from vlmfast.cli._progress import Progress

    with AuditStore(db) as store, Progress(enabled=False if args.fleet_no_progress else None) as prog:
        bar = prog.stage("models", len(entries))

        def tick(r):
            bar.advance(r.line())

        if args.fleet_ray is not None:
            from vlmfast.fleet import audit_fleet_ray

            summary = audit_fleet_ray(entries, audits, store, splits,
                                      address=None if args.fleet_ray == "local" else args.fleet_ray,
                                      num_cpus=args.fleet_ray_cpus, n=args.fleet_n, seed=args.fleet_seed,
                                      force=args.fleet_force, progress=tick,
                                      device=args.fleet_device, batch_size=args.fleet_batch_size)
        else:
            summary = audit_fleet(entries, audits, store, splits, n=args.fleet_n, seed=args.fleet_seed,
                                  force=args.fleet_force, progress=tick,
                                  bars=not args.fleet_no_progress, device=args.fleet_device,
                                  batch_size=args.fleet_batch_size)
        if csv_path is not None:
            store.export_csv(csv_path)
    for note in summary.notes:
        print(f"note: {note}")
    print(f"summary: {summary.line()}" + (f"; results: {db}" if db else "") + (f"; csv: {csv_path}" if csv_path
                                                                                else ""))
    return 1 if summary.failed else 0
