"""``vlmfast calibration LOGITS``: calibration metrics of saved logits — a table, and optionally JSON and a PNG.

LOGITS is a ``.safetensors``, ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``, never unpickled),
``.npy`` or ``.npz`` file holding ``(M, N, C)`` or ``(N, C)`` logits. The labels (``(N,)`` or ``(M, N)``) live in
the same file under the key ``labels`` unless ``--labels FILE`` names another file; ``--logits-key`` and
``--labels-key`` pick tensors by name when a file holds several.

The files (``--json``, ``--plot``; parent folders are created) are written before the table is printed, so a
reader that stops early (``| head``) never leaves them unwritten. The JSON is strict: NaN (empty bins) is ``null``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmfast.cli._common import output_path, write_json


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("calibration", help="calibration metrics of saved logits",
                       description="Calibration metrics of saved logits: a markdown table on stdout, optionally every "
                                   "metric as strict JSON (--json) and reliability diagrams (--plot).")
    p.add_argument("logits", help="file with (M, N, C) or (N, C) logits: .safetensors, .pt, .pth, .npy or .npz")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="file with the labels, (N,) or (M, N) integers (default: LOGITS itself)")
    p.add_argument("--logits-key", default=None, metavar="KEY",
                   help="the logits' tensor in LOGITS (default: 'logits', or the file's only tensor)")
    p.add_argument("--labels-key", default=None, metavar="KEY",
                   help="the labels' tensor (default: 'labels', or the only tensor of --labels FILE)")
    p.add_argument("--n-bins", type=int, default=15, help="number of bins (default 15)")
    p.add_argument("--binning", choices=("width", "mass"), default="width")
    p.add_argument("--convention", choices=("standard", "dac"), default="standard")
    p.add_argument("--per-batch", type=int, default=None, metavar="SIZE",
                   help="also CaRot's per-batch ECE over batches of SIZE samples")
    p.add_argument("--names", default=None, help="comma-separated model names, one per model")
    p.add_argument("--json", default=None, metavar="FILE", help="write every metric to this JSON file")
    p.add_argument("--plot", default=None, metavar="FILE", help="write reliability diagrams to this PNG")
    p.add_argument("--backend", default=None, help="force a backend (see `vlmfast info`); default: the fastest")
    p.set_defaults(run=run)
    return p


def _pick(tensors: dict, path: str, key: str | None, default: str, option: str):
    """The tensor ``key`` of a file, else ``default`` if the file has it, else the file's only tensor."""
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{option}: {path} has no tensor {key!r}; it holds {sorted(tensors)}")
        return tensors[key]
    if default in tensors:
        return tensors[default]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: holds {len(tensors)} tensors {sorted(tensors)} and none is called {default!r}; "
                     f"choose one with {option}")


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(logits, labels) as the options describe; each file is read once."""
    from vlmfast.io import load_tensors

    tensors = load_tensors(args.logits)
    if args.labels is None:
        lk, yk = args.logits_key or "logits", args.labels_key or "labels"
        missing = [k for k in dict.fromkeys((lk, yk)) if k not in tensors]
        if missing or lk == yk:
            why = f"missing {missing}" if missing else f"--logits-key and --labels-key both name {lk!r}"
            raise ValueError(f"{args.logits}: without --labels the file must hold 'logits' and 'labels' (or the "
                             f"tensors named by --logits-key/--labels-key); {why}, found {sorted(tensors)}")
        return tensors[lk], tensors[yk]
    logits = _pick(tensors, args.logits, args.logits_key, "logits", "--logits-key")
    labels_file = tensors if Path(args.labels) == Path(args.logits) else load_tensors(args.labels)
    labels = _pick(labels_file, args.labels, args.labels_key, "labels", "--labels-key")
    return logits, labels


def _names(value: str | None, n_models: int) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",")]
    if len(names) != n_models or not all(names):
        raise ValueError(f"--names: expected {n_models} non-empty comma-separated names (one per model), "
                         f"got {value!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from vlmfast.metrics import calibration

    json_path = output_path(args.json, "--json")
    plot_path = output_path(args.plot, "--plot")
    logits, labels = load_inputs(args)
    res = calibration(logits, labels, args.n_bins, binning=args.binning, convention=args.convention,
                      per_batch=args.per_batch, backend=args.backend)
    names = _names(args.names, res.n_models)
    if json_path is not None:
        write_json(json_path, {"models": names, **res.to_dict()})
    if plot_path is not None:
        from vlmfast.plot import reliability_diagram

        reliability_diagram(res, plot_path, names)
    print(res.table(names))
    return 0
