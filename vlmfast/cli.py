"""The ``vlmfast`` command.

    vlmfast info [--json]                   what this installation can run (backends, build, GPU)
    vlmfast demo [--out DIR]                the offline demo audit (``make demo``)
    vlmfast calibration LOGITS [--labels F] calibration metrics of saved logits: a table, JSON and a PNG

LOGITS is a ``.safetensors``, ``.pt``, ``.npy`` or ``.npz`` file holding ``(M, N, C)`` or ``(N, C)`` logits
(keys ``logits`` and ``labels`` when both live in one file); ``.pt`` files are read with
``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from vlmfast import info

    return info.main(["--json"] if args.json else [])


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlmfast import demo

    argv = ["--out", args.out, "--n-test", str(args.n_test), "--presets", args.presets]
    if args.backend:
        argv += ["--backend", args.backend]
    return demo.main(argv)


def _cmd_calibration(args: argparse.Namespace) -> int:
    from vlmfast.io import load_tensor, load_tensors
    from vlmfast.metrics import calibration

    if args.labels is None:
        d = load_tensors(args.logits)
        missing = [k for k in ("logits", "labels") if k not in d]
        if missing:
            raise ValueError(f"{args.logits}: without --labels the file must hold 'logits' and 'labels'; "
                             f"missing {missing}, found {sorted(d)}")
        logits, labels = d["logits"], d["labels"]
    else:
        logits = load_tensor(args.logits, "logits" if "logits" in load_tensors(args.logits) else None)
        labels = load_tensor(args.labels, "labels" if "labels" in load_tensors(args.labels) else None)
    res = calibration(logits, labels, args.n_bins, binning=args.binning, convention=args.convention,
                      per_batch=args.per_batch, backend=args.backend)
    names = args.names.split(",") if args.names else None
    print(res.table(names))
    if args.json:
        Path(args.json).write_text(json.dumps({"models": names, **res.to_dict()}, indent=1))
    if args.plot:
        from vlmfast.plot import reliability_diagram

        reliability_diagram(res, args.plot, names)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlmfast", description="Fast auditing of CLIP-style models.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, build and versions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="the offline demo audit")
    p.add_argument("--out", default="out")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--presets", default="default,test", help="pretraining presets of the fleet's bases")
    p.add_argument("--backend", default=None)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("calibration", help="calibration metrics of saved logits")
    p.add_argument("logits")
    p.add_argument("--labels", default=None)
    p.add_argument("--n-bins", type=int, default=15)
    p.add_argument("--binning", choices=("width", "mass"), default="width")
    p.add_argument("--convention", choices=("standard", "dac"), default="standard")
    p.add_argument("--per-batch", type=int, default=None)
    p.add_argument("--names", default=None, help="comma-separated model names")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.add_argument("--plot", default=None, help="write reliability diagrams to this PNG")
    p.add_argument("--backend", default=None)
    p.set_defaults(func=_cmd_calibration)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"vlmfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
