"""``vlmfast report``: the fleet report of a SQLite audit store (:func:`vlmfast.fleet.report.build_report`).

    vlmfast report audit.sqlite --out report/ [--format html,csv,parquet] [--no-plots] [--title T]

``--format`` (comma-separated, default ``html``): ``html`` writes ``DIR/index.html`` — a static page (no network):
sortable tables per audit, the per-method summary (mean ± std over seeds), ECE-vs-accuracy and PT-vs-IR scatter
plots (``DIR/plots/``, when matplotlib is installed), the failures and the provenance; ``csv`` one long-format CSV
per audit table (``DIR/<audit>.csv``); ``parquet`` the same as Parquet (needs pyarrow). The store is only read: a
missing DB is an error, never a new empty store. Prints one line per file written. User errors (a missing or
foreign DB, a store of a newer schema, a bad format, a missing pyarrow) are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="static HTML report (and CSV / Parquet exports) of a fleet audit store",
                       description="The fleet report of a SQLite audit store written by `vlmfast audit --manifest`: "
                                   "a static HTML page (sortable per-audit tables, per-method summary, scatter "
                                   "plots, failures, provenance) and CSV / Parquet exports. The store is only "
                                   "read.")
    p.add_argument("db", metavar="DB", help="the SQLite audit store (audit.sqlite)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--format", default="html", metavar="F,G",
                   help="comma-separated: html, csv, parquet (default: html)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in the HTML report")
    p.add_argument("--title", default="vlmfast fleet report", help="the page title")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmfast.fleet.report import FORMATS, write_report

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise ValueError(f"--format: expected some of {', '.join(FORMATS)}, got {args.format!r}")
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"--format: expected some of {', '.join(FORMATS)}, got {f!r}")
    db = Path(args.db)
    if db.is_dir():
        raise ValueError(f"DB: expected a SQLite file, got the folder {args.db!r}")
    if not db.is_file():
        raise ValueError(f"DB: no such file {args.db!r} (write one with `vlmfast audit --manifest M --db FILE`)")
    if not args.out.strip():
        raise ValueError(f"--out: expected a folder path, got {args.out!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, got the file {args.out!r}")
    result = write_report(db, out, formats=formats, plots=False if args.no_plots else None, title=args.title)
    for path in result.files:
        kind = {".html": "html", ".png": "plot", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix, "file")
        print(f"{kind}: {path}")
    for note in result.notes:
        if note.startswith("No plots"):
            print(f"note: {note}")
    return 0
