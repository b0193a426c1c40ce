"""``vlmfast demo`` (``make demo``): the calibration audit of a small fleet under distribution shift, offline.

1. Pretrain two tiny CLIPs on unbiased spurious-MNIST composites (:func:`vlmfast.models.pretrain_base`: the
   ``default`` preset, ~3 minutes on 2 CPU cores, and the cheaper ``test`` preset, ~30 s; both cached, so later
   runs start at once).
2. Fleet: each base zero-shot (class embeddings from the caption templates) at its learned logit scale and at
   half and double of it — six models.
3. Evaluation sets with ground truth: the in-distribution test composites, the scikit-learn digits (real 8×8
   scans: a genuine domain shift) and two corruptions of the test set (noise and blur, severity 3).
4. One :func:`vlmfast.metrics.calibration` call per evaluation set audits all six models at once; the table is
   printed, and reliability diagrams plus a JSON of every metric are written to the output folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from vlmfast.cli._common import write_json


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_fleet(presets=("default", "test"), scales=(0.5, 1.0, 2.0), device=None):
    """[(name, model, logit scale multiplier)] and the bases' cards."""
    from vlmfast.models import pretrain_base

    bases, cards = [], {}
    for preset in presets:
        t0 = time.perf_counter()
        model, card = pretrain_base(preset=preset, device=device)  # its progress: a bar on a terminal, else lines
        acc = card.get("metrics", {}).get("zero_shot_test")
        _log(f"  base '{preset}': ready in {time.perf_counter() - t0:.1f} s"
             + (f" (zero-shot test accuracy at training: {100 * acc:.1f} %)" if isinstance(acc, float) else ""))
        bases.append((preset, model))
        cards[preset] = card
    fleet = [(f"{preset} x{s:g}", model, s) for preset, model in bases for s in scales]
    return fleet, cards


def evaluation_sets(n_test: int):
    from vlmfast.data import corrupted_test, sklearn_digits, spurious_mnist

    return {
        "test (in distribution)": spurious_mnist("test", n=n_test),
        "sklearn digits (domain shift)": sklearn_digits(),
        "noise, severity 3": corrupted_test("noise", 3, n=n_test),
        "blur, severity 3": corrupted_test("blur", 3, n=n_test),
    }


@torch.no_grad()
def fleet_logits(fleet, data) -> torch.Tensor:
    """(M, N, C) zero-shot logits of every fleet member on ``data``; each base is encoded once."""
    from vlmfast.data import CAPTION_TEMPLATES
    from vlmfast.models import encode_images, zero_shot_head

    cache: dict[int, torch.Tensor] = {}
    out = []
    for _, model, mult in fleet:
        key = id(model)
        if key not in cache:
            feats = encode_images(model, data).float()
            head = zero_shot_head(model, data.classnames, CAPTION_TEMPLATES).float().to(feats.device)
            cache[key] = model.logit_scale.exp().float().cpu() * feats @ head.T
        out.append(cache[key] * mult)
    return torch.stack(out)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="the offline demo audit (make demo)",
                       description="The calibration audit of a small fleet of tiny pretrained CLIPs under "
                                   "distribution shift, offline: tables on stdout, reliability diagrams and "
                                   "calibration.json in --out.")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    p.add_argument("--n-test", type=int, default=2000, help="test composites per evaluation set (default 2000)")
    p.add_argument("--presets", default="default,test", help="pretraining presets of the bases (comma-separated)")
    p.add_argument("--backend", default=None, help="force a backend for the audit (see `vlmfast info`)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vlmfast import _dispatch
    from vlmfast.metrics import calibration
    from vlmfast.plot import reliability_diagram

    if isinstance(args.n_test, bool) or not isinstance(args.n_test, int) or args.n_test < 1:
        raise ValueError(f"--n-test: expected a positive integer, got {args.n_test!r}")
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    if not presets:
        raise ValueError(f"--presets: expected comma-separated preset names, got {args.presets!r}")
    _dispatch.forced_backend(args.backend)  # an invalid name fails now, not after the pretraining
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    _log("Pretraining (or loading) the bases ...")
    fleet, cards = build_fleet(presets)
    names = [name for name, _, _ in fleet]
    _log(f"Fleet: {len(fleet)} models: {', '.join(names)}\n")

    summary: dict[str, dict] = {}
    for title, data in evaluation_sets(args.n_test).items():
        logits = fleet_logits(fleet, data)
        t0 = time.perf_counter()
        res = calibration(logits, data.labels, n_bins=15, backend=args.backend)
        dt = 1e3 * (time.perf_counter() - t0)
        _log(f"## {title}: {logits.shape[1]} samples, audited in {dt:.1f} ms (backend {res.backend})\n")
        _log(res.table(names) + "\n")
        slug = title.split(" (")[0].replace(",", "").replace(" ", "-")
        reliability_diagram(res, out / f"reliability-{slug}.png", names, title=f"Reliability: {title}")
        summary[title] = {"models": names, **res.to_dict()}

    write_json(out / "calibration.json", {"bases": cards, "sets": summary})
    _log("Accuracy / ECE per evaluation set:\n")
    header = "| model | " + " | ".join(summary) + " |"
    _log(header + "\n|---|" + "---|" * len(summary))
    for i, name in enumerate(names):
        cells = [f"{100 * s['accuracy'][i]:.1f} % / {s['ece'][i]:.3f}" for s in summary.values()]
        _log(f"| {name} | " + " | ".join(cells) + " |")
    _log(f"\nwrote {out}/reliability-*.png and {out}/calibration.json")
    return 0
