"""``vlmfast finetune``: prompt tuning (CoOp / CoCoOp / KgCoOp, optionally + DOR) on the built-in digits data, in
the base-to-new protocol — or robust fine-tuning (FLYP / CaRot / FT / LP / LP-FT) with ID and shifted evaluation.

Robust methods (``--method flyp|carot|ft|lp|lpft``): a copy of the model is fine-tuned on all ten digit classes of
``spurious_mnist("train", strength=0)`` (progress bar), then the zero-shot model and the fine-tuned classifier are
evaluated on ``spurious_mnist("test")`` (ID) and six shifts (scikit-learn digits, five corruptions at
``--severity``; :func:`vlmfast.tuning.robust.digit_splits`): accuracy, global and per-batch ECE, NLL, Brier,
sigma_min. ``--wise`` adds a WiSE-FT sweep. Written to ``--out``: the model + head (safetensors + card) and
``results.json``.

The ten digit classes are split as in CoCoOp (:func:`vlmfast.tuning.base_to_new_split`: "zero".."four" base,
"five".."nine" new). The learner trains on ``--shots`` images per base class of ``spurious_mnist("train",
strength=0)`` (the engine's progress bar), and is evaluated with zero-shot CLIP on ``spurious_mnist("test")``: base
and new as separate closed-set problems, accuracy, H and calibration (10 bins). Written to ``--out``: the learner
(``learner.safetensors`` + ``learner.json``) and ``results.json`` (strict JSON) — before the table is printed.

``--plan plan.yaml``: a whole fleet of runs instead (:mod:`vlmfast.cli.plan`; ``--method`` and the other
single-run options are then refused; ``--only`` picks runs or entries of the plan).

``--model``: an open_clip config name at random init (e.g. ``vlmfast-tiny-vit``: fast, meaningless numbers) or
``base``: the tiny pretrained CLIP of :func:`vlmfast.models.pretrain_base` (``--base-preset``, cached after the
first run). The DOR pool excludes both base and new class names.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmfast.cli._common import write_json

PROMPT_METHODS = ("coop", "cocoop", "kgcoop")
ROBUST_METHODS = ("flyp", "carot", "ft", "lp", "lpft")
REGION_METHODS = ("ravl",)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help="prompt tuning (CoOp/CoCoOp/KgCoOp, +DOR) or robust fine-tuning "
                                        "(FLYP/CaRot/FT/LP/LP-FT) on the digits",
                       description="Prompt-tune a frozen CLIP on the built-in digits (base classes) and report "
                                   "base/new accuracy, H and calibration against zero-shot; or fine-tune it "
                                   "(FLYP, CaRot, FT, LP, LP-FT) and report ID / shifted accuracy and calibration.")
    p.add_argument("--method", choices=PROMPT_METHODS + ROBUST_METHODS + REGION_METHODS, default=None,
                   help="the method of a single run (default coop)")
    p.add_argument("--plan", default=None, metavar="PLAN.yaml",
                   help="run every run of a fine-tuning plan into --out, then --out/manifest.yaml")
    p.add_argument("--only", default=None, metavar="RUN,ENTRY",
                   help="--plan: only these run ids / entry names (and the runs they depend on)")
    p.add_argument("--dor", action="store_true", help="add the DOR outlier regulariser")
    p.add_argument("--model", default="base",
                   help="an open_clip config name (random init) or 'base' (the tiny pretrained CLIP; default)")
    p.add_argument("--base-preset", default="test", help="pretrain_base preset for --model base (default: test)")
    p.add_argument("--shots", type=int, default=16, help="training images per base class (default 16)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (prompt) / 128 (robust)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.002 prompt; robust: the reference's, see robust.DEFAULTS)")
    p.add_argument("--n-ctx", type=int, default=None, help="context tokens (default: the method's)")
    p.add_argument("--ctx-init", default=None, help="init phrase, e.g. 'a photo of a' (default: the method's)")
    p.add_argument("--position", choices=("end", "middle", "front"), default="end", help="class token position")
    p.add_argument("--dor-k", type=int, default=5000, help="outlier pool size (default 5000)")
    p.add_argument("--dor-lam", type=float, default=None, help="DOR weight (default 8 CoOp, 2 others)")
    p.add_argument("--train-n", type=int, default=2000, help="size of the digits training build (default 2000)")
    p.add_argument("--test-n", type=int, default=1000, help="test composites (default 1000)")
    p.add_argument("--severity", type=int, default=3, help="corruption severity of the robust shifts (default 3)")
    p.add_argument("--wise", action="store_true", help="robust methods: WiSE-FT sweep alpha = 0, 0.1, ..., 1")
    p.add_argument("--strength", type=float, default=None,
                   help="Cramer's V of the red square with 'nine' in the training build (default 0 for the robust "
                        "methods, 0.95 for ravl)")
    p.add_argument("--discovery", default=None,
                   help="ravl: the output folder of `vlmfast audit spurious` (its medoids and Stage-1 model)")
    p.add_argument("--lam", type=float, default=0.8, help="ravl: weight of the CLIP loss (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when available)")
    p.add_argument("--out", default="out/finetune", help="output folder (default: out/finetune)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmfast.data import CLASSNAMES, spurious_mnist
    from vlmfast.models import create_model, pretrain_base
    from vlmfast.models.text import encode_images
    from vlmfast.tuning import base_to_new_split, evaluate_base_to_new, fit, format_base_to_new

    if args.plan is not None:
        from vlmfast.cli.plan import run_plan_cli

        return run_plan_cli(args)
    if args.only is not None:
        raise ValueError("--only: picks runs of a --plan; got no --plan")
    if args.method is None:
        args.method = "coop"
    if not str(args.out).strip():
        raise ValueError(f"--out: expected a folder, got {args.out!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: expected a folder, got the file {str(out)!r}")
    robust = args.method in ROBUST_METHODS + REGION_METHODS
    if args.strength is None:
        args.strength = 0.95 if args.method in REGION_METHODS else 0.0
    if not 0.0 <= args.strength < 1.0:
        raise ValueError(f"--strength: expected a number in [0, 1), got {args.strength}")
    if args.method in REGION_METHODS and not args.discovery:
        raise ValueError("--discovery: --method ravl needs the output folder of `vlmfast audit spurious`")
    if args.method not in ROBUST_METHODS + REGION_METHODS and args.strength:
        raise ValueError("--strength: prompt tuning trains on the unbiased build; drop --strength")
    if args.batch_size is None:
        args.batch_size = 128 if robust else 32
    for opt, v, low in (("--shots", args.shots, 1), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                        ("--train-n", args.train_n, 20), ("--test-n", args.test_n, 1), ("--seed", args.seed, 0),
                        ("--dor-k", args.dor_k, 1), ("--severity", args.severity, 1)):
        if v < low:
            raise ValueError(f"{opt}: expected an int >= {low}, got {v}")
    if args.severity > 5:
        raise ValueError(f"--severity: expected an int in [1, 5], got {args.severity}")
    if robust and args.dor:
        raise ValueError(f"--dor: the DOR term is a prompt-tuning regulariser; --method {args.method} has none")
    progress = False if args.no_progress else None
    if args.model == "base":
        model, _ = pretrain_base(preset=args.base_preset, device=args.device, progress=progress)
    else:
        model = create_model(args.model, device=args.device)
    if args.method in REGION_METHODS:
        return _run_ravl(args, model, out, progress)
    if robust:
        return _run_robust(args, model, out, progress)
    if args.lr is None:
        args.lr = 0.002
    base_ids, new_ids = base_to_new_split(CLASSNAMES)
    base_names, new_names = [CLASSNAMES[i] for i in base_ids], [CLASSNAMES[i] for i in new_ids]
    train = spurious_mnist("train", n=args.train_n, strength=0.0, seed=args.seed)
    train = train.subset(torch.nonzero(torch.as_tensor(train.labels) < len(base_ids)).flatten())
    test = spurious_mnist("test", n=args.test_n, seed=args.seed)

    learner = fit(model, train, base_names, args.method, args.dor, shots=args.shots, n_ctx=args.n_ctx,
                  ctx_init=args.ctx_init, class_token_position=args.position, steps=args.steps,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, dor_k=args.dor_k, dor_lam=args.dor_lam,
                  new_classnames=new_names, progress=progress)
    feats = encode_images(model, test)
    name = f"{args.method}{'+dor' if args.dor else ''}"
    rows = {"zero-shot": evaluate_base_to_new(model, None, test, CLASSNAMES, image_features=feats),
            name: evaluate_base_to_new(model, learner, test, CLASSNAMES, image_features=feats)}
    learner.train_log.setdefault("metrics", {}).update(
        {f"{part}_{k}": rows[name][part][k] for part in ("base", "new") for k in ("accuracy", "ece")})
    learner.train_log["metrics"]["H"] = rows[name]["H"]
    weights = learner.save(out / "learner", extra={"data": {"train": "spurious_mnist(train, strength=0)",
                                                            "train_n": args.train_n, "test_n": args.test_n,
                                                            "base": base_names, "new": new_names},
                                                   "model_arg": args.model})
    write_json(out / "results.json", {"method": name, "model": args.model, "seed": args.seed,
                                      "learner": str(weights), "results": rows,
                                      "train_losses": learner.train_log.get("losses", [])})
    print(format_base_to_new(rows))
    print(f"learner: {weights} (+ .json); results: {out / 'results.json'}")
    return 0


def _run_robust(args: argparse.Namespace, model: Any, out: Path, progress: Any) -> int:
    from vlmfast.data import CLASSNAMES, spurious_mnist
    from vlmfast.tuning import robust as R

    train = spurious_mnist("train", n=args.train_n, strength=args.strength, seed=args.seed)
    res = R.fit(model, train, args.method, classnames=list(CLASSNAMES), steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress)
    splits, id_name, ood = R.digit_splits(args.test_n, args.seed, args.severity)
    rows = {"zero-shot": R.evaluate(res.zero_shot, splits), args.method: R.evaluate(res.classifier, splits)}
    sweep = []
    if args.wise:
        alphas = [i / 10 for i in range(11)]
        sweep = [(a, r) for a, r in R.wise_ft(res.zero_shot, res.classifier, alphas,
                                              lambda c: R.evaluate(c, splits))]
        for a, r in sweep:
            if a not in (0.0, 1.0):
                rows[f"wise-ft a={a:.1f}"] = r
    res.train_log.setdefault("metrics", {}).update({f"id_{k}": v for k, v in rows[args.method][id_name].items()})
    folder = res.save(out / "model")
    write_json(out / "results.json", {"method": args.method, "model": args.model, "seed": args.seed,
                                      "severity": args.severity, "id": id_name, "ood": ood, "results": rows,
                                      "hparams": res.hparams, "checkpoint": str(folder),
                                      "train_losses": res.train_log.get("losses", [])})
    print(R.format_results(rows, id_name, ood))
    print(f"model + head: {folder}; results: {out / 'results.json'}")
    return 0


def _run_ravl(args: argparse.Namespace, model: Any, out: Path, progress: Any) -> int:
    import json

    from safetensors.torch import load_file

    from vlmfast.cli.audit import load_clip
    from vlmfast.data import CLASSNAMES, spurious_mnist
    from vlmfast.tuning import region as TR

    disc = Path(args.discovery)
    if not (disc / "results.json").is_file() or not (disc / "medoids.safetensors").is_file():
        raise ValueError(f"--discovery: expected a folder with results.json and medoids.safetensors (the output of "
                         f"`vlmfast audit spurious`), got {str(disc)!r}")
    info = json.loads((disc / "results.json").read_text())
    if not info.get("found"):
        raise ValueError(f"--discovery: {disc} found no spurious cluster; nothing to mitigate")
    med = load_file(str(disc / "medoids.safetensors"))
    ids = med["spurious_ids"].tolist()[:1]  # the top cluster
    _, stage1 = load_clip(info["model"], base_preset=info.get("base_preset", "test"), device=args.device,
                          progress=progress)
    train = spurious_mnist("train", n=args.train_n, strength=args.strength, seed=args.seed)
    test = spurious_mnist("test", n=args.test_n, seed=args.seed + 1)
    split = TR.split_regions(stage1, train, med["medoid_embeddings"], ids)
    res = TR.fit(model, train, split=split, classnames=list(CLASSNAMES), steps=args.steps,
                 batch_size=args.batch_size, lr=1e-4 if args.lr is None else args.lr, lam=args.lam, seed=args.seed,
                 progress=progress)
    rows = {"zero-shot": TR.evaluate_groups(res.zero_shot.eval(), test),
            "ravl": TR.evaluate_groups(res.classifier, test)}
    folder = res.save(out / "model")
    write_json(out / "results.json", {"method": "ravl", "model": args.model, "seed": args.seed,
                                      "strength": args.strength, "discovery": str(disc), "spurious_ids": ids,
                                      "split": split.summary(), "results": rows, "hparams": res.hparams,
                                      "checkpoint": str(folder), "train_losses": res.train_log.get("losses", [])})
    print("| model | image acc | image worst-group | region acc | region worst-group |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['image']['accuracy']:.1f} | {100 * r['image']['worst_group']:.1f} | "
              f"{100 * r['region']['accuracy']:.1f} | {100 * r['region']['worst_group']:.1f} |")
    print(f"model + head: {folder}; results: {out / 'results.json'}")
    return 0
