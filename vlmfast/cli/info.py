"""``vlmfast info``: versions, build, GPU, the forced backend, every backend and why (not), per op the backend
a call would get. Exit status 2 (and a one-line error) when the forced backend (``--backend`` or
``VLMFAST_BACKEND``) is not a backend name — every real call would fail; the report is printed first."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="backends, build and versions",
                       description="Versions, build, GPU, the forced backend, every backend and why (not), and "
                                   "per op the backend a call would get. Exit status 2 when the forced backend is "
                                   "not a backend name.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--backend", default=None,
                   help="show what forcing this backend would do (default: VLMFAST_BACKEND, if set)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vlmfast.cli._common import strict
    from vlmfast.info import format_info, info_dict

    d = info_dict(args.backend)
    print(json.dumps(strict(d), indent=2, allow_nan=False) if args.json else format_info(d))
    error = d["forced_backend"]["error"]
    if error is not None:
        raise ValueError(error)
    return 0
