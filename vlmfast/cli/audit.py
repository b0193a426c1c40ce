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
import dataclasses
import re
from pathlib import Path
from typing import Any

from vlmfast.cli._common import write_json


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="model audits: rationality (PT / IR of explanation heatmaps), spurious (RaVL); "
                                     "--manifest: the fleet audit into SQLite",
                       description="Model audits on the built-in data. With --manifest (and no subcommand): every "
                                   "model of a manifest x audit x split into a SQLite store (vlmfast/cli/fleet.py).")
    audits = p.add_subparsers(dest="audit", required=False, metavar="{rationality,spurious}")
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
    sp = audits.add_parser("spurious", help="RaVL discovery: region clusters that a model's errors depend on",
                           description="RaVL stage 1 on the built-in spurious-MNIST evaluation set: region "
                                       "embeddings of the four quadrants, the k-medoids sweep, cluster gaps and "
                                       "influence, the kept clusters ranked; Precision@10 against the red-square "
                                       "quadrants; a gallery PNG of the top cluster.")
    sp.add_argument("--model", required=True, metavar="MODEL",
                    help="'base', 'base:CONFIG', an open_clip config name, a finetune output folder, or a checkpoint")
    sp.add_argument("--base-preset", default="test", help="pretrain_base preset for 'base' models (default: test)")
    sp.add_argument("--n", type=int, default=1000, help="evaluation composites (default 1000)")
    sp.add_argument("--seed", type=int, default=0, help="data seed and k-medoids seed (default 0)")
    sp.add_argument("--ks", default=None, help="k range A:B (default: the reference's 2C:5C)")
    sp.add_argument("--no-clip", action="store_true",
                    help="cluster on 1 - cos unclipped (default: clipped to [0, 1] as the reference)")
    sp.add_argument("--threshold", type=float, default=0.25, help="influence filter H >= threshold (default 0.25)")
    sp.add_argument("--method", choices=("auto", "roi", "patch", "crop"), default="auto",
                    help="region embeddings (default: roi for ResNets, patch for ViTs)")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--gallery", type=int, default=20, help="regions of the top cluster in the PNG (0: none)")
    sp.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when available)")
    sp.add_argument("--out", default="out/spurious", help="output folder (default: out/spurious)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(run=run_spurious)
    from vlmfast.cli import fleet as _fleet

    _fleet.add_arguments(p, audits)  # --manifest ...: the fleet audit; a subcommand is then optional
    return p


def load_clip(spec: str, *, base_preset: str, device: Any, progress: Any):
    """``(name, CLIP model)`` of a ``--model`` entry (a finetune folder gives its fine-tuned CLIP model, whatever
    its method)."""
    path = Path(spec)
    if path.is_dir():
        from vlmfast.tuning import robust as R

        folder = path if (path / "head.safetensors").is_file() else path / "model"
        if not (folder / "head.safetensors").is_file():
            raise ValueError(f"--model: {spec} is a folder without head.safetensors (expected the output of "
                             "`vlmfast finetune`)")
        model, _, card = R.load_robust(folder, device=device)
        return f"{path.name}:{card.get('hparams', {}).get('method', '')}", model
    return load_audited(spec, base_preset=base_preset, device=device, progress=progress)


def run_spurious(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from vlmfast.audit.spurious import discover, precision_at_k
    from vlmfast.data import CLASSNAMES, REGION_SPURIOUS, spurious_mnist

    for opt, v, low in (("--n", args.n, 20), ("--seed", args.seed, 0), ("--batch-size", args.batch_size, 1),
                        ("--gallery", args.gallery, 0)):
        if v < low:
            raise ValueError(f"--{opt.lstrip('-')}: expected an int >= {low}, got {v}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: expected a number in [0, 1], got {args.threshold}")
    ks = None
    if args.ks is not None:
        m = re.fullmatch(r"(\d+):(\d+)", args.ks)
        if not m or not 2 <= int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"--ks: expected A:B with 2 <= A < B, got {args.ks!r}")
        ks = range(int(m.group(1)), int(m.group(2)))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, got the file {str(out)!r}")
    progress = False if args.no_progress else None
    name, model = load_clip(args.model, base_preset=args.base_preset, device=args.device, progress=progress)
    data = spurious_mnist("test", n=args.n, seed=args.seed)
    res = discover(model, data, list(CLASSNAMES), ks=ks, clip_distances=not args.no_clip, threshold=args.threshold,
                   seed=args.seed, method=args.method, batch_size=args.batch_size, progress=not args.no_progress)
    truth = (torch.as_tensor(data.region_labels) == REGION_SPURIOUS).reshape(-1).numpy()
    k_q = data.region_boxes.shape[1]
    boxes = torch.as_tensor(data.region_boxes).reshape(-1, 4)

    def region_row(r: int) -> dict:
        return {"region": r, "image": r // k_q, "box": boxes[r].tolist(), "is_square": bool(truth[r])}

    clusters = [{"id": c.id, "gap": c.gap, "influence": c.influence, "attribute": c.attribute_name,
                 "regions": len(c.regions), "images": len(c.images), "medoid": c.medoid,
                 "square_fraction": float(truth[c.regions].mean()) if c.regions else None,
                 "top_regions": [region_row(r) for r in c.regions[:10]],
                 "table": [dataclasses.asdict(row) for row in c.table]} for c in res.clusters]
    out.mkdir(parents=True, exist_ok=True)
    med_file = None
    if res.medoid_embeddings is not None:
        med_file = out / "medoids.safetensors"
        save_file({"medoid_embeddings": torch.from_numpy(np.ascontiguousarray(res.medoid_embeddings)),
                   "spurious_ids": torch.tensor(res.spurious_ids, dtype=torch.int64)}, str(med_file))
    gallery = None
    if args.gallery and res.found:
        from vlmfast.plot import region_gallery

        top = res.top.regions[:args.gallery]
        idx = torch.tensor(top)
        gallery = str(region_gallery(torch.as_tensor(data.images)[idx // k_q], boxes[idx].float(),
                                     out / "gallery.png", [f"img {int(i) // k_q} y={CLASSNAMES[int(data.labels[int(i) // k_q])]}"
                                                           for i in top],
                                     title=f"{name}: top cluster {res.top.id} (G = {res.top.gap:.3f}, "
                                           f"H = {res.top.influence:.2f})"))
    p10 = precision_at_k(res, truth, 10)
    write_json(out / "results.json", {"model": args.model, "name": name, "base_preset": args.base_preset,
                                      "n": args.n, "seed": args.seed, "k": res.k, "silhouette": res.silhouette,
                                      "clip_distances": not args.no_clip, "threshold": args.threshold,
                                      "found": res.found, "precision_at_10": p10, "summary": res.summary(),
                                      "clusters": clusters, "notes": res.notes, "medoids": str(med_file),
                                      "gallery": gallery})
    print(res.summary())
    if res.found:
        print("| rank | cluster | G | H | regions | square fraction | attribute |")
        print("|---|---|---|---|---|---|---|")
        for i, c in enumerate(clusters):
            print(f"| {i + 1} | {c['id']} | {c['gap']:.4f} | {c['influence']:.3f} | {c['regions']} | "
                  f"{c['square_fraction']:.2f} | {c['attribute']} |")
        print("| class | acc present (n) | acc absent (n) |")
        print("|---|---|---|")
        for row in res.top.table:
            print(f"| {row.name or row.label} | {row.acc_present:.3f} ({row.n_present}) | "
                  f"{row.acc_absent:.3f} ({row.n_absent}) |")
    print(f"Precision@10 (red-square quadrants): {p10:.2f}; results: {out / 'results.json'}"
          + (f"; gallery: {gallery}" if gallery else ""))
    return 0


def split_data(split: str, n: int, seed: int):
    """The ``--split`` of the audits: ``test``, ``sklearn-digits`` or ``KIND-SEVERITY``."""
    from vlmfast.fleet.runner import build_split

    return build_split(split, n, seed, what="--split", id_name="test", folders=False)


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
