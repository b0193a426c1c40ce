"""``vlmfast audit rationality``: explanation heatmaps of many models on the built-in digits, scored against the
ground-truth digit (its tight box, as the reference's ImageNet boxes, or ``--mask stroke``) — Prediction Trustworthiness (PT = P(valid | correct)), Inference Reliability
(IR = P(correct | valid)), mean relevance-mass accuracy, the four counts — plus overlay PNGs of a sample of images
per cell (right/wrong x valid/invalid).

``--models``: any number of
  * ``base`` (the tiny pretrained CLIP, ``pretrain_base`` with ``--base-preset``) or ``base:CONFIG`` (its
    recipe for another open_clip config, e.g. ``base:vlmfast-tiny-vit``);
  * an open_clip config name (random init: a sanity baseline);
  * a folder written by ``vlmfast finetune --method flyp|carot|ft|lp|lpft`` (``<out>/model``): FT / LP / LP-FT are
    explained through their classifier head (all blocks), FLYP / CaRot as CLIP models (last block);
  * a vlmfast checkpoint (``.safetensors`` + card) of a CLIP model.

The split (``--split``): ``test`` (``spurious_mnist("test")``), ``sklearn-digits`` or ``KIND-SEVERITY`` (a corrupted
test split, e.g. ``noise-3``). Targets: ``logit_scale * cos(image, "a photo of a {class}")`` of the ground-truth
class for CLIP models, the head's ground-truth logit for classifiers. Written to ``--out``: ``results.json`` and
``overlays/<model>.png`` — before the table is printed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vlmfast.cli._common import write_json


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="model audits: rationality (PT / IR of explanation heatmaps)",
                       description="Model audits on the built-in data.")
    audits = p.add_subparsers(dest="audit", required=True, metavar="{rationality}")
    r = audits.add_parser("rationality", help="PT / IR of explanation heatmaps against the digit masks",
                          description="Heatmaps of every model explaining the ground-truth digit, scored against "
                                      "the digit masks: PT, IR, mean RMA, counts; overlay PNGs.")
    r.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="'base', 'base:CONFIG', an open_clip config name, a finetune output folder, or a checkpoint")
    r.add_argument("--base-preset", default="test", help="pretrain_base preset for 'base' models (default: test)")
    r.add_argument("--split", default="test", help="test | sklearn-digits | KIND-SEVERITY (default: test)")
    r.add_argument("--n", type=int, default=500, help="images (default 500)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--blocks", choices=("auto", "last", "all"), default="auto",
                   help="ViT relevance blocks (default: last for CLIP models, all for classifier heads)")
    r.add_argument("--mask", choices=("box", "stroke"), default="box",
                   help="ground truth: the digit's tight box (as the reference's ImageNet boxes; default) or its "
                        "stroke pixels")
    r.add_argument("--threshold", type=float, default=0.5, help="RMA threshold of valid evidence (default 0.5)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--overlays", type=int, default=4, help="overlay images per cell and model (0: none)")
    r.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when available)")
    r.add_argument("--out", default="out/rationality", help="output folder (default: out/rationality)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(run=run_rationality)
    return p


def split_data(split: str, n: int, seed: int):
    from vlmfast.data import CORRUPTIONS, corrupted_test, sklearn_digits, spurious_mnist

    if split == "test":
        return spurious_mnist("test", n=n, seed=seed)
    if split == "sklearn-digits":
        return sklearn_digits(n=n, seed=seed)
    m = re.fullmatch(r"([a-z]+)-([1-5])", split)
    if m and m.group(1) in CORRUPTIONS:
        return corrupted_test(m.group(1), int(m.group(2)), n=n, seed=seed)
    raise ValueError(f"--split: expected test, sklearn-digits or KIND-SEVERITY with KIND in {CORRUPTIONS} and "
                     f"SEVERITY in 1..5, got {split!r}")


def load_audited(spec: str, *, base_preset: str, device: Any, progress: Any):
    """``(name, model_or_classifier)`` of a ``--models`` entry."""
    from vlmfast.models import create_model, list_models, load_checkpoint, pretrain_base

    if spec == "base" or spec.startswith("base:"):
        config = spec.split(":", 1)[1] if ":" in spec else "vlmfast-tiny-rn"
        model, _ = pretrain_base(config=config, preset=base_preset, device=device, progress=progress)
        return spec, model
    path = Path(spec)
    if path.is_dir():
        from vlmfast.tuning import robust as R

        folder = path if (path / "head.safetensors").is_file() else path / "model"
        if not (folder / "head.safetensors").is_file():
            raise ValueError(f"--models: {spec} is a folder without head.safetensors (expected the output of "
                             "`vlmfast finetune --method flyp|carot|ft|lp|lpft`)")
        model, clf, card = R.load_robust(folder, device=device)
        method = card.get("hparams", {}).get("method", "")
        return f"{path.name}:{method}", (clf if method in ("ft", "lp", "lpft") else model)
    if spec in list_models():
        return f"{spec} (random init)", create_model(spec, device=device)
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".safetensors").is_file():
        model, _ = load_checkpoint(path, device=device)
        return path.stem, model
    raise ValueError(f"--models: {spec!r} is neither 'base', an open_clip config name, a finetune folder nor a "
                     "checkpoint file")


def digit_masks(data, kind: str):
    """Ground-truth masks of the digits: ``"box"`` (the tight digit box, filled) or ``"stroke"`` (its pixels)."""
    import torch

    from vlmfast.metrics import masks_from_boxes

    if kind == "stroke":
        return torch.as_tensor(data.digit_masks)
    return masks_from_boxes(torch.as_tensor(data.boxes).float(), tuple(data.images.shape[-2:]))


def _cells(correct, valid):
    return {"RR": correct & valid, "RW": correct & ~valid, "WR": ~correct & valid, "WW": ~correct & ~valid}


def run_rationality(args: argparse.Namespace) -> int:
    import torch

    from vlmfast.audit import heatmaps
    from vlmfast.data import CLASSNAMES
    from vlmfast.metrics import rationality

    for opt, v, low in (("--n", args.n, 1), ("--seed", args.seed, 0), ("--batch-size", args.batch_size, 1),
                        ("--overlays", args.overlays, 0)):
        if v < low:
            raise ValueError(f"{opt}: expected an int >= {low}, got {v}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: expected a number in [0, 1], got {args.threshold}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, got the file {str(out)!r}")
    data = split_data(args.split, args.n, args.seed)
    progress = False if args.no_progress else None
    rows: dict[str, Any] = {}
    overlay_files = []
    for spec in args.models:
        name, model = load_audited(spec, base_preset=args.base_preset, device=args.device, progress=progress)
        h = heatmaps(model, data.images, data.labels, classnames=list(CLASSNAMES),
                     blocks=None if args.blocks == "auto" else args.blocks, batch_size=args.batch_size,
                     progress=not args.no_progress, desc=name)
        masks = digit_masks(data, args.mask).to(h.maps.device)
        r = rationality(h.maps, masks, h.correct, threshold=args.threshold)
        rows[name] = {"method": h.method, "accuracy": float(h.correct.float().mean()), **r.as_dict()}
        if args.overlays:
            from vlmfast.plot import heatmap_overlays

            pick, titles = [], []
            for cell, sel in _cells(h.correct.cpu(), r.valid.cpu()).items():
                for i in torch.nonzero(sel).flatten()[:args.overlays].tolist():
                    pick.append(i)
                    titles.append(f"{cell} y={int(data.labels[i])} p={int(h.predictions[i])} "
                                  f"rma={float(r.rma[i]):.2f}")
            if pick:
                idx = torch.tensor(pick)
                safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
                overlay_files.append(str(heatmap_overlays(
                    torch.as_tensor(data.images)[idx], h.maps.cpu()[idx], masks.cpu()[idx],
                    out / "overlays" / f"{safe}.png", titles, title=f"{name} ({h.method}) on {args.split}")))
    write_json(out / "results.json", {"split": args.split, "n": args.n, "seed": args.seed, "mask": args.mask,
                                      "threshold": args.threshold, "results": rows, "overlays": overlay_files})
    head = "| model | heatmap | accuracy | PT | IR | mean RMA (correct) | RR | RW | WR | WW | constant |"
    print(head)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['method']} | {100 * r['accuracy']:.1f} | {100 * r['pt']:.1f} | {100 * r['ir']:.1f} | "
              f"{r['mean_rma_correct']:.3f} | {r['RR']} | {r['RW']} | {r['WR']} | {r['WW']} | {r['n_constant']} |")
    print(f"results: {out / 'results.json'}" + (f"; overlays: {out / 'overlays'}" if overlay_files else ""))
    return 0
