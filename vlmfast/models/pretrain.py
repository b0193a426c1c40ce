"""A pretrained base without downloads: contrastive pretraining of a tiny CLIP on unbiased spurious-MNIST composites.

:func:`pretrain_base` trains ``vlmfast-tiny-rn`` (or any open_clip config) on ``spurious_mnist("train",
strength=0)`` — the red square independent of the class — with the composites' varied captions, and measures
zero-shot accuracy on ``spurious_mnist("test")`` (class prompts from ``CAPTION_TEMPLATES``, embeddings averaged per
class) and on the shifted splits (scikit-learn digits; corruptions at severity 5). The result is cached under
``cache_dir("models")`` as a vlmfast checkpoint (safetensors + JSON card), keyed by a hash of (config name and
dict, data parameters, recipe, seed, format version); it is written atomically (a killed run leaves no entry) and
under a file lock (concurrent callers, e.g. pytest-xdist workers, train once and share the result).

**Recipe** (``PRESETS["default"]``, ``vlmfast-tiny-rn``):

* 10,000 composites (9,500 train after the builder's 5 % holdout), batch 128, **600 steps** (time cap 300 s);
* AdamW (betas 0.9 / 0.98, eps 1e-6), lr 2e-3, weight decay 0.1 on matrices only (not on biases, norms,
  positional/token embeddings or the logit scale);
* **text tower learning rate = 0.05 x the image tower's.** With equal rates the tiny text tower collapses within
  ~10 steps (every class caption gets the same embedding; the loss sits at log B); a slow text tower avoids it;
* linear warm-up (5 %), then cosine decay to 0; the schedule's progress is ``max(step / steps, elapsed /
  time_budget_s)``, so a run that hits the time cap still anneals fully and stops on time (``card["stopped_by"]``);
* learnable logit scale (init 1/0.07), clamped to [1, 100];
* **class-aware contrastive targets**: captions of the same class are positives of each other (each image's target
  is uniform over the in-batch captions of its class, and symmetrically for captions). With 10 classes a batch of
  128 holds ~13 captions per class, which one-hot InfoNCE would push apart as negatives; the class-aware loss
  learns several times faster at this size. ``targets="clip"`` gives plain one-hot InfoNCE;
* **digit zoom** (``zoom_p=0.25``): a quarter of each batch is replaced by the digit's quadrant alone, resized to
  the full input, with its caption — the scale a region has in :func:`vlmfast.models.region_features`. It costs
  nothing in image-level accuracy and makes region embeddings meaningful (60-s runs: zero-shot on the digit
  quadrant 29 % -> 97 % by crop-and-encode, 70 % -> 78 % by RoIAlign at layer2);
* the text tower runs EOT-truncated (:mod:`vlmfast.models.text`): captions are <= 8 tokens.

**Measured** (2 shared CPU cores, torch 2.14.1): ``preset="default"``: 97.8-98.4 % zero-shot on test after 600
steps in 178-182 s of training (~195 s in all with data and evaluation; two runs); scikit-learn digits 76-77 %,
severity-5 corruptions blur 35-47 %, occlusion 53 %, noise / contrast / invert 10-13 %.
``preset="test"`` (4,000 composites, batch 64, 160 steps): 94 % on test (seeds 0 and 2) in 22-24 s of training
(~30 s in all), scikit-learn digits 48-50 %, noise-5 10 %. Learning has a sharp onset, and CPU training is not
bit-reproducible under thread contention (e.g. pytest-xdist neighbours), so the test preset stays well past it:
with the same recipe, 60 steps gave 36 %, 80 steps 59 %, 100 steps 85 %, 120 steps 75-92 % (seeds 0-3, with and
without contention), 160 steps 94 %.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmfast._cache import cache_dir, stable_hash

PRETRAIN_FORMAT_VERSION = 1
METHOD = "clip-pretrain"

# Recipes. ``steps=None`` means "as many as fit in time_budget_s".
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        steps=600, time_budget_s=300.0, batch_size=128, lr=2e-3, text_lr_scale=0.05, weight_decay=0.1,
        warmup=0.05, init_logit_scale=1 / 0.07, max_logit_scale=100.0, targets="class", zoom_p=0.25,
        train_n=10_000, test_n=2000, shift_n=None, eval_corruptions=("noise", "blur", "contrast", "invert",
                                                                      "occlusion"),
    ),
    "test": dict(
        steps=160, time_budget_s=120.0, batch_size=64, lr=2e-3, text_lr_scale=0.05, weight_decay=0.1,
        warmup=0.1, init_logit_scale=1 / 0.07, max_logit_scale=100.0, targets="class", zoom_p=0.25,
        train_n=4000, test_n=500, shift_n=500, eval_corruptions=("noise",),
    ),
}
_RECIPE_KEYS = ("batch_size", "lr", "text_lr_scale", "weight_decay", "warmup", "init_logit_scale",
                "max_logit_scale", "targets")
TARGETS = ("class", "clip")


def _param_groups(model: torch.nn.Module, lr: float, text_lr: float, weight_decay: float):
    """AdamW groups: image tower and logit scale at ``lr``, text tower at ``text_lr``; weight decay on matrices
    only (no decay for biases, norms, positional/token embeddings and the logit scale)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = "image" if name.startswith("visual.") or name in ("logit_scale", "logit_bias") else "text"
        no_decay = p.ndim < 2 or "positional_embedding" in name or "token_embedding" in name
        groups.setdefault((tower, no_decay), []).append(p)
    return [
        {"params": params, "base_lr": lr if tower == "image" else text_lr, "lr": lr if tower == "image" else text_lr,
         "weight_decay": 0.0 if no_decay else weight_decay}
        for (tower, no_decay), params in groups.items()
    ]


def _zoom_digits(model, x, images, idx, digit_boxes, p, gen):
    """Replace a random fraction ``p`` of the batch by the digit's region alone, resized to the full input (the
    scale a region has in ``region_features``), keeping the caption."""
    from vlmfast.models.factory import preprocess_for

    pick = (torch.rand(len(idx), generator=gen) < p) & (digit_boxes[idx, 2] > digit_boxes[idx, 0])
    x = x.clone() if pick.any() else x
    for r in torch.nonzero(pick).flatten().tolist():
        x1, y1, x2, y2 = (int(v) for v in digit_boxes[idx[r]])
        crop = images[idx[r]: idx[r] + 1, :, y1:y2, x1:x2]
        x[r: r + 1] = preprocess_for(model, crop).to(x.dtype)
    return x


def _digit_region_boxes(data: Any) -> torch.Tensor:
    """(N, 4) int64 box of the region holding the digit (``region_labels == REGION_DIGIT``); [0, 0, 0, 0] where
    there is none."""
    from vlmfast.data import REGION_DIGIT

    labels = getattr(data, "region_labels", None)
    boxes = getattr(data, "region_boxes", None)
    if labels is None or boxes is None:
        raise ValueError("zoom_p: needs a dataset with .region_boxes and .region_labels (where the digit is); "
                         "pass zoom_p=0 for other data")
    labels, boxes = torch.as_tensor(labels), torch.as_tensor(boxes).long()
    is_digit = labels == REGION_DIGIT
    which = is_digit.float().argmax(1)
    out = boxes[torch.arange(len(which)), which].clone()
    out[~is_digit.any(1)] = 0
    return out


def _lr_factor(progress: float, warmup: float) -> float:
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    t = (progress - warmup) / max(1e-12, 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor | None):
    """Symmetric InfoNCE over normalised features; with ``labels`` the targets are uniform over same-label pairs."""
    logits = scale * img @ txt.T
    if labels is None:
        target = torch.arange(img.shape[0], device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    same = (labels[:, None] == labels[None, :]).float()
    t = same / same.sum(1, keepdim=True)
    return 0.5 * (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean())


def zero_shot_accuracy(model: torch.nn.Module, data: Any, templates=None, *, batch_size: int = 256) -> float:
    """Top-1 zero-shot accuracy of ``model`` on a dataset with ``.images``, ``.labels``, ``.classnames`` (class
    prompts from ``templates``, default ``vlmfast.data.CAPTION_TEMPLATES``, averaged per class)."""
    from vlmfast.models.text import encode_images, zero_shot_head

    if templates is None:
        from vlmfast.data import CAPTION_TEMPLATES as templates
    was_training = model.training
    model.eval()
    try:
        head = zero_shot_head(model, list(data.classnames), list(templates))
        feats = encode_images(model, data, batch_size=batch_size)
    finally:
        model.train(was_training)
    pred = (feats @ head.T.to(feats.device)).argmax(1)
    return float((pred == torch.as_tensor(data.labels).to(pred.device)).float().mean())


def _evaluate(model, recipe: dict[str, Any], seed: int, log) -> dict[str, float]:
    from vlmfast.data import corrupted_test, sklearn_digits, spurious_mnist

    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    metrics["zero_shot_test"] = zero_shot_accuracy(model, spurious_mnist("test", n=recipe["test_n"], seed=seed))
    metrics["zero_shot_sklearn_digits"] = zero_shot_accuracy(model, sklearn_digits(n=recipe["shift_n"], seed=seed))
    for kind in recipe["eval_corruptions"]:
        ds = corrupted_test(kind, 5, n=recipe["test_n"], seed=seed)
        metrics[f"zero_shot_{kind}_5"] = zero_shot_accuracy(model, ds)
    log(f"eval: {json.dumps({k: round(v, 4) for k, v in metrics.items()})} ({time.perf_counter() - t0:.1f} s)")
    return metrics


def _cache_key(config: str, data_desc: dict[str, Any], recipe: dict[str, Any], seed: int) -> str:
    from vlmfast.models.factory import get_model_config

    return stable_hash({"config": config, "model_cfg": get_model_config(config), "data": data_desc,
                        "recipe": recipe, "seed": seed, "v": PRETRAIN_FORMAT_VERSION, "method": METHOD})


def pretrain_base(
    config: str = "vlmfast-tiny-rn",
    data: Any = None,
    *,
    preset: str = "default",
    steps: int | None = None,
    time_budget_s: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    cache: bool = True,
    device: str | torch.device | None = None,
    evaluate: bool = True,
    verbose: bool = False,
    **recipe_overrides: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Contrastively pretrain a tiny CLIP on unbiased composites; returns ``(model, card)`` (model in eval mode).

    ``config``: an open_clip config name. ``data``: None builds ``spurious_mnist("train", n=recipe train_n,
    strength=0, seed=seed)``; or pass any dataset with ``.images`` (uint8 (N, 3, H, W)), ``.captions`` and
    ``.labels`` (it is then hashed for the cache key). ``preset``: ``"default"`` (~5 minutes on 2 CPU cores) or
    ``"test"`` (well under a minute); ``steps``, ``time_budget_s``, ``batch_size`` and the other recipe keys
    (``lr``, ``text_lr_scale``, ``weight_decay``, ``warmup``, ``targets`` = "class" | "clip", ...) override the
    preset. Training stops at ``steps`` or ``time_budget_s``, whichever comes first, with the learning-rate schedule
    following whichever is nearer its end. ``cache``: read/write ``cache_dir("models")/clip-pretrain-<hash>.*``.
    ``evaluate``: zero-shot accuracies on test and shifted splits go into ``card["metrics"]``.
    """
    from vlmfast.models.checkpoint import load_checkpoint

    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    recipe = dict(PRESETS[preset])
    unknown = sorted(set(recipe_overrides) - set(recipe))
    if unknown:
        raise TypeError(f"pretrain_base: unknown recipe keys {unknown}; expected some of {sorted(recipe)}")
    recipe.update(recipe_overrides)
    if steps is not None:
        recipe["steps"] = steps
    if time_budget_s is not None:
        recipe["time_budget_s"] = time_budget_s
    if batch_size is not None:
        recipe["batch_size"] = batch_size
    if recipe["steps"] is not None and (isinstance(recipe["steps"], bool) or not isinstance(recipe["steps"], int)
                                        or recipe["steps"] < 1):
        raise ValueError(f"steps: expected a positive int or None, got {recipe['steps']!r}")
    if recipe["time_budget_s"] is None and recipe["steps"] is None:
        raise ValueError("steps/time_budget_s: at least one must be set")
    if recipe["time_budget_s"] is not None and not recipe["time_budget_s"] > 0:
        raise ValueError(f"time_budget_s: expected > 0 or None, got {recipe['time_budget_s']!r}")
    if not isinstance(recipe["batch_size"], int) or recipe["batch_size"] < 2:
        raise ValueError(f"batch_size: expected an int >= 2, got {recipe['batch_size']!r}")
    if recipe["targets"] not in TARGETS:
        raise ValueError(f"targets: expected one of {TARGETS}, got {recipe['targets']!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    log = print if verbose else (lambda *a, **k: None)

    if data is None:
        data_desc: dict[str, Any] = {"source": "spurious_mnist", "split": "train", "n": recipe["train_n"],
                                     "strength": 0.0, "seed": seed}
    else:
        from vlmfast.models.text import tensor_hash

        for attr in ("images", "captions", "labels"):
            if not hasattr(data, attr):
                raise TypeError(f"data: expected a dataset with .images, .captions and .labels; missing .{attr}")
        data_desc = {"source": type(data).__name__, "images": tensor_hash(torch.as_tensor(data.images)),
                     "captions": stable_hash(list(data.captions)), "n": int(len(data.captions))}
    key_recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()}
    key = _cache_key(config, data_desc, key_recipe, seed)
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", config)
    base = cache_dir("models") / f"{METHOD}-{safe_name}-{key}"
    if not cache:
        return _train(config, data, data_desc, recipe, key_recipe, key, preset, seed, device, evaluate, verbose,
                      None, log)
    # One process trains a given entry; others (e.g. pytest-xdist workers) wait for it and read the result.
    with _file_lock(base.with_name(base.name + ".lock")):
        if base.with_name(base.name + ".json").is_file():
            try:
                model, card = load_checkpoint(base, device=device)
                log(f"pretrain_base: cached {base}")
                return model, card
            except Exception as e:  # a damaged entry is retrained and overwritten
                log(f"pretrain_base: ignoring unreadable cache entry {base}: {e}")
        return _train(config, data, data_desc, recipe, key_recipe, key, preset, seed, device, evaluate, verbose,
                      base, log)


def _train(config, data, data_desc, recipe, key_recipe, key, preset, seed, device, evaluate, verbose, base, log):
    from vlmfast.models.checkpoint import save_checkpoint
    from vlmfast.models.factory import _resolve_device, create_model, get_tokenizer, preprocess_for
    from vlmfast.models.text import _encode_truncated, _text_parts, tokenize

    if data is None:
        from vlmfast.data import spurious_mnist

        data = spurious_mnist("train", n=recipe["train_n"], strength=0.0, seed=seed)
    images = torch.as_tensor(data.images)
    labels = torch.as_tensor(data.labels).long()
    dev = _resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = create_model(config, pretrained=None, device=dev)
    tok = tokenize(list(data.captions), get_tokenizer(config))
    parts = _text_parts(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(recipe["init_logit_scale"]))
    max_log_scale = math.log(recipe["max_logit_scale"])
    groups = _param_groups(model, recipe["lr"], recipe["lr"] * recipe["text_lr_scale"], recipe["weight_decay"])
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    zoom_p = float(recipe.get("zoom_p", 0.0))
    digit_boxes = None
    if zoom_p > 0:
        digit_boxes = _digit_region_boxes(data)
    n = images.shape[0]
    bs = min(recipe["batch_size"], n)
    model.train()
    t_start = time.perf_counter()
    step, progress, perm, pos = 0, 0.0, torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    while progress < 1.0:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        factor = _lr_factor(progress, recipe["warmup"])
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        x = preprocess_for(model, images[idx])
        if zoom_p > 0:
            x = _zoom_digits(model, x, images, idx, digit_boxes, zoom_p, gen)
        img = F.normalize(model.encode_image(x), dim=-1)
        t = tok[idx].to(dev)
        txt = _encode_truncated(parts, t) if parts is not None else model.encode_text(t)
        txt = F.normalize(txt, dim=-1)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(),
                                labels[idx].to(dev) if recipe["targets"] == "class" else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        step += 1
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t_start
        progress = max(step / recipe["steps"] if recipe["steps"] else 0.0,
                       elapsed / recipe["time_budget_s"] if recipe["time_budget_s"] else 0.0)
        if verbose and (step % 20 == 0 or progress >= 1.0):
            log(f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} scale "
                f"{float(model.logit_scale.exp()):.1f} lr x{factor:.3f} {elapsed:.1f} s")
    wall = time.perf_counter() - t_start
    model.eval()
    metrics = _evaluate(model, recipe, seed, log) if evaluate else {}
    card = {
        "config": config,
        "method": METHOD,
        "data": data_desc,
        "recipe": key_recipe,
        "preset": preset,
        "metrics": metrics,
        "steps": step,
        "stopped_by": "steps" if recipe["steps"] and step >= recipe["steps"] else "time",
        "wall_time_s": round(wall, 2),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "seed": seed,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cache_key": key,
        "pretrain_format_version": PRETRAIN_FORMAT_VERSION,
    }
    if base is not None:
        save_checkpoint(model, base, card)
    return model, card


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (``fcntl.flock``) on ``path``; a no-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
