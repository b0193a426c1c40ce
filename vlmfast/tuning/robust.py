"""Robust fine-tuning of a CLIP model: FLYP, CaRot, FT, LP, LP-FT and WiSE-FT, on the training engine, with the
evaluation CaRot reports (accuracy, global and per-batch ECE, NLL, Brier, and the smallest singular value of the
standardized image-embedding covariance). Spec: ``shared/specs/methods_carot.md``.

Methods (:func:`fit`, ``method=``):

* ``"flyp"`` — contrastive fine-tuning of **both towers** with class-template captions: image i of class c is
  paired with ``T_k(c)``, a template drawn per image per step (:func:`vlmfast.train.step_generator`); symmetric
  InfoNCE on the fused op (:func:`vlmfast.functional.clip_loss`; same-class captions of other images are
  negatives, as the reference; ``targets="class"`` masks them instead); learnable logit scale, no clamp.
* ``"carot"`` — FLYP plus ``lam_oc * ||W^T W - I||_F`` on the image projection ``W`` (unsquared; ``oc_squared``),
  ``lam_cf * ||W_v W_t^T||_F`` (the cross-Frobenius term of the official command), and ``lam_sd * L_SD``: soft-target
  CE toward an **EMA teacher** in both directions, summed (inside the same fused op call). The teacher is updated
  after the optimizer step every ``ema_every`` steps (step 0 included) with momentum ramped 0.05 -> 0.9 over the
  first 20 % of the steps; after each update its text features for every (class, template) caption are computed
  once and cached, so a step runs only the teacher's image tower (no grad). ``L_SD`` counts from step 1.
* ``"ft"`` — cross-entropy on the image tower plus a linear head initialised from the zero-shot head
  (``logit_scale * normalized class embeddings``); the text tower is not used; gradient clipping 1.0.
* ``"lp"`` — a linear head on the frozen **raw** image features (computed once), random init (the reference's).
* ``"lpft"`` — ``"lp"`` for ``lp_steps``, then ``"ft"`` from that head.

Every classifier is :class:`ImageClassifier`: ``logits = head(normalize(visual(x)))``. For FLYP/CaRot the head is
re-derived from the fine-tuned text tower (zero-shot head times the fine-tuned model's logit scale), as the
reference evaluates. WiSE-FT (:func:`wise_ft`) interpolates every tensor of two classifiers' state dicts,
``theta_a = (1 - a) theta_zs + a theta_ft``, into one preallocated classifier in place (no checkpoint reloading)
and evaluates each alpha of a sweep.

Optimisation: AdamW, weight decay on **all** parameters (the reference's), linear warm-up then cosine decay,
bf16 autocast on CUDA and fp32 on CPU (``precision``), seeds, resumable checkpoints (the EMA teacher is part of the
checkpoint). Defaults are the reference's (lr 1e-5 FLYP/CaRot, 3e-5 FT, wd 0.1) except where the reference has
none (LP: lr 1e-3, no decay). The EMA period default scales the reference's 500 of 25,030 steps to ``steps``.

Deviations: no image augmentation (the reference crops at scale 0.9-1.0); the per-batch ECE uses the evaluation
set's own order (the reference's ImageFolder order is class-sorted). LP / LP-FT classifiers take raw features as
the reference's, so WiSE-FT between them and the zero-shot classifier (normalized features) is refused.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmfast.train.engine import Callback as _Callback

METHODS = ("flyp", "carot", "ft", "lp", "lpft")
TARGETS = ("clip", "class")
#: The reference's hyper-parameters (ViT-B/16 on ImageNet, 25,030 steps of 512) where it has them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "flyp": dict(lr=1e-5, weight_decay=0.1, grad_clip=None),
    "carot": dict(lr=1e-5, weight_decay=0.1, grad_clip=None),
    "ft": dict(lr=3e-5, weight_decay=0.1, grad_clip=1.0),
    "lp": dict(lr=1e-3, weight_decay=0.0, grad_clip=None),
    "lpft": dict(lr=3e-5, weight_decay=0.1, grad_clip=1.0),
}
CAROT = dict(lam_oc=0.2, lam_cf=0.05, lam_sd=1.5, ema_m0=0.05, ema_m1=0.9, ema_ramp=0.2)
REFERENCE_STEPS, REFERENCE_EMA_EVERY = 25_030, 500
#: Per-batch ECE batch size of the reference evaluation.
EVAL_BATCH = 512


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_real(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name}: expected a finite number >= {low}, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# The classifier every method produces
# ----------------------------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """``logits = head(normalize(visual(x)))`` (``normalize=True``) or ``head(visual(x))``: an image tower and a
    linear head ``(C, D)`` (+ bias).

    ``visual``: the image tower (``model.visual`` of an open_clip model; registered, so its parameters are part of
    the state dict). ``weight``: ``(C, D)`` head; ``bias``: ``(C,)`` or None (zeros). ``normalize``: L2-normalize
    the features first (zero-shot, FT, FLYP, CaRot); the reference's linear probe (LP, LP-FT) uses raw features."""

    def __init__(self, visual: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 normalize: bool = True) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight: expected a (C, D) head, got shape {tuple(weight.shape)}")
        self.visual = visual
        self.normalize = bool(normalize)
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            self.head.weight.copy_(weight.float())
            self.head.bias.copy_(bias.float() if bias is not None else torch.zeros(weight.shape[0]))
        self.head.to(weight.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input ``(B, D)`` of preprocessed images (normalized unless ``normalize=False``)."""
        f = self.visual(images).float()
        return F.normalize(f, dim=-1) if self.normalize else f

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def zero_shot_classifier(model: nn.Module, classnames: Sequence[str], templates: Sequence[str],
                         *, visual: nn.Module | None = None) -> ImageClassifier:
    """The zero-shot classifier of ``model``: head = ``exp(logit_scale) * zero_shot_head(model, classnames,
    templates)`` (the logit scale of the model being evaluated, as the reference), on ``visual`` (default
    ``model.visual``, shared, not copied)."""
    from vlmfast.models.text import zero_shot_head

    head = zero_shot_head(model, list(classnames), list(templates))
    scale = float(model.logit_scale.detach().exp()) if getattr(model, "logit_scale", None) is not None else 100.0
    return ImageClassifier(model.visual if visual is None else visual, scale * head)


# ----------------------------------------------------------------------------------------------------------
# CaRot's regularisers
# ----------------------------------------------------------------------------------------------------------


def image_projection(model: nn.Module) -> torch.Tensor:
    """The image tower's final projection ``W (width, D)`` (features = pooled @ W): ``visual.proj`` of a ViT, or
    the attention pool's output projection ``attnpool.c_proj.weight.T`` of a ModifiedResNet (the reference's RN50
    line is broken; its intent is this matrix). ValueError for other towers."""
    vis = getattr(model, "visual", model)
    proj = getattr(vis, "proj", None)
    if isinstance(proj, torch.Tensor):
        return proj
    pool = getattr(vis, "attnpool", None)
    if pool is not None and isinstance(getattr(pool, "c_proj", None), nn.Linear):
        return pool.c_proj.weight.t()
    head = getattr(vis, "head", None)
    if isinstance(getattr(head, "proj", None), nn.Linear):  # timm towers
        return head.proj.weight.t()
    raise ValueError(f"model: no image projection found on {type(vis).__name__} (expected visual.proj, "
                     "visual.attnpool.c_proj or visual.head.proj)")


def text_projection(model: nn.Module) -> torch.Tensor:
    """The text tower's projection ``W_t (width_t, D)``."""
    proj = getattr(model, "text_projection", None)
    if proj is None and getattr(model, "text", None) is not None:
        proj = getattr(model.text, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.weight.t()
    if isinstance(proj, torch.Tensor):
        return proj
    raise ValueError(f"model: no text projection found on {type(model).__name__}")


def orthogonality_penalty(w: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """``||W^T W - I||_F`` (CaRot's L_OC on the image projection; unsquared unless ``squared``)."""
    w = w.float()
    gram = w.t() @ w
    diff = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    sq = (diff * diff).sum()
    return sq if squared else sq.sqrt()


def cross_frobenius(w_v: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``||W_v W_t^T||_F`` (unsquared), ``W_v (width_v, D)``, ``W_t (width_t, D)``."""
    return torch.linalg.matrix_norm(w_v.float() @ w_t.float().t())


def ema_momentum(step: int, steps: int, m0: float = 0.05, m1: float = 0.9, ramp: float = 0.2) -> float:
    """The reference's EMA momentum: ``m0 + (m1 - m0) * step / (ramp * steps)`` for the first ``ramp`` of the
    steps, then ``m1``."""
    span = ramp * steps
    if span > 0 and step < span:
        return m0 + (m1 - m0) * step / span
    return m1


def default_ema_every(steps: int) -> int:
    """The reference's EMA period (500 of 25,030 steps) scaled to ``steps``."""
    return max(1, round(steps * REFERENCE_EMA_EVERY / REFERENCE_STEPS))


class EMATeacher(_Callback):
    """The CaRot teacher: a frozen copy of the student, ``psi <- m psi + (1 - m) theta`` over the parameters after
    the optimizer step when ``step % every == 0`` (kept as ``period``); ``on_update(teacher)`` runs after each update (the text-feature
    cache). A training-engine callback: its state (teacher weights) goes into the resumable checkpoints."""

    def __init__(self, student: nn.Module, steps: int, every: int, *, m0: float = 0.05, m1: float = 0.9,
                 ramp: float = 0.2, on_update: Callable[[nn.Module], None] | None = None) -> None:
        self.student, self.steps, self.period = student, steps, every
        self.every = 1  # the engine's call period: every step (the EMA period is ``period``)
        self.m0, self.m1, self.ramp = m0, m1, ramp
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        self.on_update = on_update
        self.updates = 0
        if on_update is not None:
            on_update(self.teacher)

    @torch.no_grad()
    def update(self, step: int) -> None:
        m = ema_momentum(step, self.steps, self.m0, self.m1, self.ramp)
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
            pt.mul_(m).add_(ps.detach().to(pt.dtype), alpha=1.0 - m)
        self.updates += 1
        if self.on_update is not None:
            self.on_update(self.teacher)

    def on_step_end(self, state) -> None:
        step = state.step - 1  # the step that just ran (0-based)
        if step % self.period == 0:
            self.update(step)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()},
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.updates = int(state["updates"])
        if self.on_update is not None:
            self.on_update(self.teacher)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RobustResult:
    """What :func:`fit` returns: the fine-tuned CLIP ``model`` (a copy; the input is untouched), its
    ``classifier`` (on ``model.visual``), the ``zero_shot`` classifier of the input model (for WiSE-FT), the
    ``teacher`` (CaRot), ``hparams`` and ``train_log``."""

    method: str
    model: nn.Module
    classifier: ImageClassifier
    zero_shot: ImageClassifier
    classnames: list[str]
    templates: list[str]
    hparams: dict[str, Any] = field(default_factory=dict)
    train_log: dict[str, Any] = field(default_factory=dict)
    teacher: nn.Module | None = None

    def card(self) -> dict[str, Any]:
        return {"method": f"robust-{self.method}", "classnames": self.classnames, "templates": self.templates,
                "hparams": self.hparams, "train": {k: v for k, v in self.train_log.items() if k != "losses"}}

    def save(self, path: str | os.PathLike) -> Path:
        """``<path>/model.safetensors`` + ``.json`` (the fine-tuned CLIP, :func:`vlmfast.models.save_checkpoint`)
        and ``<path>/head.safetensors`` (the classifier head). Returns the folder."""
        from safetensors.torch import save_file

        from vlmfast.models.checkpoint import json_safe, save_checkpoint

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, out / "model", json_safe(self.card()))
        head = self.classifier.head
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  str(out / "head.safetensors"), metadata={"normalize": str(self.classifier.normalize)})
        return out


def load_robust(path: str | os.PathLike, *, device: str | torch.device | None = None) -> tuple[nn.Module, ImageClassifier, dict]:
    """``(model, classifier, card)`` of a :meth:`RobustResult.save` folder (safetensors only: no unpickling)."""
    from safetensors.torch import load_file

    from vlmfast.models.checkpoint import load_checkpoint

    folder = Path(path)
    model, card = load_checkpoint(folder / "model", device=device)
    head_file = folder / "head.safetensors"
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file}: no classifier head in {folder}")
    head = load_file(str(head_file))
    from safetensors import safe_open

    with safe_open(str(head_file), framework="pt") as fh:
        normalize = (fh.metadata() or {}).get("normalize", "True") == "True"
    dev = next(model.parameters()).device
    return model, ImageClassifier(model.visual, head["weight"].to(dev), head["bias"].to(dev), normalize), card


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _train_arrays(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if data is None or not hasattr(data, "images") or not hasattr(data, "labels"):
        raise TypeError(f"data: expected a dataset with .images (N, 3, H, W) and .labels (N,), got "
                        f"{type(data).__name__}")
    images = torch.as_tensor(data.images)
    labels = torch.as_tensor(data.labels).long()
    if images.dim() != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"data: expected images (N, 3, H, W) and labels (N,) with N >= 1, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    return images, labels


def _fit_inputs(model: Any, data: Any, classnames: Sequence[str] | None, templates: Sequence[str] | None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """The checks every fine-tuning entry shares: ``(images, labels, classnames, templates)`` (class names from
    ``data.classnames`` by default, templates from ``vlmfast.data.CAPTION_TEMPLATES``)."""
    from vlmfast.data import CAPTION_TEMPLATES

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an open_clip model (torch.nn.Module), got {type(model).__name__}")
    images, labels = _train_arrays(data)
    if classnames is None:
        classnames = getattr(data, "classnames", None)
        if classnames is None:
            raise ValueError("classnames: data has no .classnames; pass classnames=[...]")
    classnames = [str(c) for c in classnames]
    if not classnames:
        raise ValueError("classnames: expected at least one class name, got none")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classnames):
        raise ValueError(f"data: labels must lie in [0, {len(classnames)}) for {len(classnames)} class names, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    templates = list(CAPTION_TEMPLATES if templates is None else templates)
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError(f"templates: expected non-empty strings with one '{{}}', got {templates!r}")
    return images, labels, classnames, templates


def _lp_head(visual_model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, n_cls: int, *, steps: int,
             lr: float, weight_decay: float, batch_size: int, seed: int, precision: str, progress) -> tuple[
                 torch.Tensor, torch.Tensor, Any]:
    """A linear probe on cached normalized features: ``(weight (C, D), bias (C,), state)``."""
    from vlmfast.train import EpochSampler, TrainConfig, step_seed
    from vlmfast.train import fit as train_fit

    g = torch.Generator().manual_seed(step_seed(seed, 0, "lp-head"))
    d = feats.shape[1]
    lin = nn.Linear(d, n_cls)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(d)
        lin.weight.copy_(torch.rand(n_cls, d, generator=g) * 2 * bound - bound)
        lin.bias.zero_()
    lin.to(feats.device)
    sampler = EpochSampler(feats.shape[0], min(batch_size, feats.shape[0]), seed=seed)

    def loss_fn(idx):
        return F.cross_entropy(lin(feats[idx]), labels[idx])

    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, warmup=0, seed=seed, precision="fp32",
                      progress=progress, log_every=max(1, min(50, steps // 4 or 1)), desc="lp")
    state = train_fit(lin, loss_fn, lambda s: sampler(s).to(feats.device), cfg,
                      params=[{"params": list(lin.parameters()), "name": "head"}])
    return lin.weight.detach().clone(), lin.bias.detach().clone(), state


def fit(
    model: nn.Module,
    data: Any,
    method: str = "flyp",
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    steps: int = 300,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup: int | float | None = None,
    grad_clip: float | None | str = "default",
    seed: int = 0,
    targets: str = "clip",
    lam_oc: float = CAROT["lam_oc"],
    lam_cf: float = CAROT["lam_cf"],
    lam_sd: float = CAROT["lam_sd"],
    oc_squared: bool = False,
    ema_every: int | None = None,
    lp_steps: int | None = None,
    lp_lr: float = DEFAULTS["lp"]["lr"],
    precision: str = "auto",
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    progress: bool | None = None,
) -> RobustResult:
    """Fine-tune a copy of ``model`` on ``data`` with ``method`` (module docstring); returns a :class:`RobustResult`.

    ``data``: ``.images`` uint8 ``(N, 3, H, W)``, ``.labels`` in ``[0, C)`` and (unless ``classnames`` is given)
    ``.classnames``. ``templates``: caption templates with one ``{}`` (default ``vlmfast.data.CAPTION_TEMPLATES``);
    FLYP/CaRot draw one per image per step; the zero-shot heads average them. ``steps`` AdamW steps of
    ``batch_size`` images; ``lr`` / ``weight_decay`` / ``grad_clip`` default to :data:`DEFAULTS`; ``warmup``
    (default 500 / 25,030 of the steps, the reference's ratio, at least 1). ``targets``: ``"clip"`` (one-hot, the
    reference) or ``"class"`` (same-class captions are positives). CaRot: ``lam_oc``, ``lam_cf``, ``lam_sd``,
    ``oc_squared``, ``ema_every`` (default :func:`default_ema_every`). LP-FT: ``lp_steps`` (default ``steps // 2``)
    at ``lp_lr``, then ``steps`` FT steps. ``checkpoint_dir``: resumable (a rerun continues exactly).
    """
    from vlmfast.models.factory import get_tokenizer, preprocess_for, resolve_device
    from vlmfast.models.text import encode_images, encode_truncated, fill_templates, text_parts, tokenize
    from vlmfast.ops.contrastive_loss import clip_loss
    from vlmfast.train import EpochSampler, TrainConfig, step_generator
    from vlmfast.train import fit as train_fit

    _check_choice("method", method, METHODS)
    images, labels, classnames, templates = _fit_inputs(model, data, classnames, templates)
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_choice("targets", targets, TARGETS)
    defaults = DEFAULTS[method]
    lr = defaults["lr"] if lr is None else _check_real("lr", lr)
    weight_decay = defaults["weight_decay"] if weight_decay is None else _check_real("weight_decay", weight_decay)
    grad_clip = defaults["grad_clip"] if grad_clip == "default" else (
        None if grad_clip is None else _check_real("grad_clip", grad_clip))
    for name, v in (("lam_oc", lam_oc), ("lam_cf", lam_cf), ("lam_sd", lam_sd)):
        _check_real(name, v)
    if ema_every is not None:
        _check_int("ema_every", ema_every, 1)
    if warmup is None:
        warmup = max(1, round(steps * REFERENCE_EMA_EVERY / REFERENCE_STEPS))
        warmup = min(warmup, steps - 1) if steps > 1 else 0
    if device is not None:
        model = model.to(resolve_device(device))

    zs_model = model
    zero_shot = zero_shot_classifier(zs_model, classnames, templates)
    student = copy.deepcopy(model)
    dev = next(student.parameters()).device
    n = images.shape[0]
    bs = min(batch_size, n)
    sampler = EpochSampler(n, bs, seed=seed)
    log_every = max(1, min(50, steps // 4 or 1))
    hparams: dict[str, Any] = dict(method=method, steps=steps, batch_size=bs, lr=lr, weight_decay=weight_decay,
                                   grad_clip=grad_clip, seed=seed, precision=precision, n_train=n,
                                   optimizer="AdamW (decay on all parameters)", schedule="linear warm-up + cosine",
                                   augmentation="none")
    train_log: dict[str, Any] = {}
    teacher_cb = None

    def ckpt(sub: str) -> dict[str, Any]:
        if checkpoint_dir is None:
            return dict(checkpoint_dir=None, checkpoint_every=None)
        return dict(checkpoint_dir=Path(checkpoint_dir) / sub, checkpoint_every=checkpoint_every)

    if method in ("flyp", "carot"):
        parts = text_parts(student)
        tok = tokenize(fill_templates(classnames, templates), get_tokenizer(student)).to(dev)
        n_t = len(templates)
        ys = labels.to(dev)
        cached: dict[str, torch.Tensor] = {}

        def encode_text(m, t):
            p = text_parts(m)
            return encode_truncated(p, t) if p is not None else m.encode_text(t)

        def refresh(teacher: nn.Module) -> None:
            with torch.no_grad():
                cached["text"] = encode_text(teacher, tok).float()

        if method == "carot":
            every = default_ema_every(steps) if ema_every is None else ema_every
            teacher_cb = EMATeacher(student, steps, every, m0=CAROT["ema_m0"], m1=CAROT["ema_m1"],
                                    ramp=CAROT["ema_ramp"], on_update=refresh)
            w_v, w_t = image_projection(student), text_projection(student)  # fail early on unknown towers
            hparams.update(lam_oc=lam_oc, lam_cf=lam_cf, lam_sd=lam_sd, oc_squared=oc_squared, ema_every=every,
                           ema_momentum=f"{CAROT['ema_m0']} -> {CAROT['ema_m1']} over the first "
                                        f"{int(CAROT['ema_ramp'] * 100)} % of the steps")
        hparams.update(targets=targets, templates=len(templates))

        def batches(step: int) -> dict[str, Any]:
            idx = sampler(step)
            tid = torch.randint(0, n_t, (idx.shape[0],), generator=step_generator(seed, step, "template"))
            return {"x": preprocess_for(student, images[idx]), "cap": (labels[idx] * n_t + tid).to(dev),
                    "idx": idx.to(dev), "step": step}

        def loss_fn(b: dict[str, Any]) -> dict[str, Any]:
            img = student.encode_image(b["x"])
            txt = encode_text(student, tok[b["cap"]])
            s = student.logit_scale.exp()
            y = ys[b["idx"]] if targets == "class" else None
            out: dict[str, Any] = {}
            if method == "carot" and b["step"] > 0 and lam_sd > 0:
                t = teacher_cb.teacher
                with torch.no_grad():
                    tf = t.encode_image(b["x"])
                c, d = clip_loss(img, txt, s, labels=y, teacher=(tf, cached["text"][b["cap"]], t.logit_scale.exp()))
                loss = c + lam_sd * d
                out["sd"] = d.detach()
            else:
                c = clip_loss(img, txt, s, labels=y)
                loss = c
            out["mcl"] = c.detach()
            if method == "carot":
                if lam_oc > 0:
                    oc = orthogonality_penalty(image_projection(student), oc_squared)
                    loss = loss + lam_oc * oc
                    out["oc"] = oc.detach()
                if lam_cf > 0:
                    cf = cross_frobenius(image_projection(student), text_projection(student))
                    loss = loss + lam_cf * cf
                    out["cf"] = cf.detach()
            out["loss"] = loss
            return out

        cfg = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
                          seed=seed, precision=precision, progress=progress, log_every=log_every, desc=method,
                          **ckpt(method))
        student.train()
        params = [{"params": [p for p in student.parameters() if p.requires_grad], "name": "all"}]
        state = train_fit(student, loss_fn, batches, cfg, params=params,
                          callbacks=[teacher_cb] if teacher_cb is not None else [])
        student.eval()
        classifier = zero_shot_classifier(student, classnames, templates)
        train_log = {"losses": list(state.losses), "history": [dict(h) for h in state.history],
                     "elapsed_s": state.elapsed_s, "resumed_from": state.resumed_from,
                     "metrics": {**{k: float(v) for k, v in state.last_metrics.items()},
                                 "loss": state.losses[-1] if state.losses else math.nan}}
        if teacher_cb is not None:
            train_log["ema_updates"] = teacher_cb.updates
    else:
        head_w = zero_shot.head.weight.detach().clone()
        head_b = torch.zeros(len(classnames), device=dev)
        if method in ("lp", "lpft"):
            student.eval()
            feats = encode_images(student, images, normalize=False).to(dev)  # raw features, frozen tower
            lps = (steps if method == "lp" else (steps // 2 if lp_steps is None else _check_int("lp_steps", lp_steps, 1)))
            lp_cfg = dict(lr=lr if method == "lp" else lp_lr,
                          weight_decay=weight_decay if method == "lp" else DEFAULTS["lp"]["weight_decay"])
            head_w, head_b, lp_state = _lp_head(student, feats, labels.to(dev), len(classnames), steps=lps,
                                                batch_size=bs, seed=seed, precision=precision, progress=progress,
                                                **lp_cfg)
            train_log["lp"] = {"steps": lps, "final_loss": lp_state.losses[-1] if lp_state.losses else None,
                               "elapsed_s": lp_state.elapsed_s, **{f"lp_{k}": v for k, v in lp_cfg.items()}}
            hparams.update(lp_steps=lps, lp_lr=lp_cfg["lr"])
        classifier = ImageClassifier(student.visual, head_w, head_b, normalize=method == "ft")
        hparams["feature_norm"] = method == "ft"
        if method in ("ft", "lpft"):
            ys = labels.to(dev)

            def batches(step: int) -> dict[str, Any]:
                idx = sampler(step)
                return {"x": preprocess_for(student, images[idx]), "y": ys[idx.to(dev)]}

            def loss_fn(b: dict[str, Any]) -> torch.Tensor:
                return F.cross_entropy(classifier(b["x"]), b["y"])

            cfg = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
                              seed=seed, precision=precision, progress=progress, log_every=log_every, desc=method,
                              **ckpt(method))
            classifier.train()
            params = [{"params": [p for p in classifier.parameters() if p.requires_grad], "name": "all"}]
            state = train_fit(classifier, loss_fn, batches, cfg, params=params)
            classifier.eval()
            train_log.update(losses=list(state.losses), history=[dict(h) for h in state.history],
                             elapsed_s=state.elapsed_s, resumed_from=state.resumed_from,
                             metrics={"loss": state.losses[-1] if state.losses else math.nan})
    hparams["warmup"] = warmup
    return RobustResult(method=method, model=student, classifier=classifier, zero_shot=zero_shot,
                        classnames=classnames, templates=templates, hparams=hparams, train_log=train_log,
                        teacher=None if teacher_cb is None else teacher_cb.teacher)


# ----------------------------------------------------------------------------------------------------------
# Evaluation and WiSE-FT
# ----------------------------------------------------------------------------------------------------------


def sigma_min(features: torch.Tensor) -> float:
    """Smallest eigenvalue (= singular value) of the covariance of the **standardized** embeddings (each dimension
    zero mean, unit variance; i.e. their correlation matrix): the quantity CaRot's bound grows with 1 / of."""
    x = features.double()
    x = x - x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-12)
    z = x / std
    cov = z.t() @ z / max(1, z.shape[0] - 1)
    return float(torch.linalg.eigvalsh(cov)[0].clamp_min(0.0))


@torch.no_grad()
def predict(classifier: ImageClassifier, data: Any, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), features (N, D))`` of a dataset's images (float32, CPU): an in-memory dataset or image
    tensor, or a streamed dataset (:class:`vlmfast.data.ImageFolderStream`, read one decoded batch at a time)."""
    from vlmfast.models.factory import preprocess_for

    if isinstance(data, torch.utils.data.Dataset) and not isinstance(getattr(data, "images", None), torch.Tensor):
        from vlmfast.data.stream import loader

        batches = (b["image"] for b in loader(data, batch_size))
    else:
        images = torch.as_tensor(data.images if hasattr(data, "images") else data)
        batches = (images[s:s + batch_size] for s in range(0, images.shape[0], batch_size))
    dev = next(classifier.parameters()).device
    was = classifier.training
    classifier.eval()
    logits, feats = [], []
    for batch in batches:
        x = preprocess_for(classifier, batch).to(dev)  # reads classifier.visual's size/norm
        f = classifier.features(x)
        logits.append(classifier.head(f).float().cpu())
        feats.append(f.float().cpu())
    classifier.train(was)
    return torch.cat(logits), torch.cat(feats)


def evaluate(classifier: ImageClassifier, splits: dict[str, Any], *, n_bins: int = 10,
             per_batch: int = EVAL_BATCH) -> dict[str, dict[str, float]]:
    """Per split: ``accuracy``, ``ece`` (global), ``ece_per_batch`` (the reference's average over consecutive
    batches of ``per_batch``), ``nll``, ``brier``, ``sigma_min`` (of the standardized image embeddings). Fractions,
    not percent."""
    from vlmfast.metrics import calibration

    out: dict[str, dict[str, float]] = {}
    for name, data in splits.items():
        logits, feats = predict(classifier, data)
        y = torch.as_tensor(data.labels).long()
        r = calibration(logits, y, n_bins=n_bins, per_batch=per_batch)
        out[name] = {"accuracy": float(r.accuracy), "ece": float(r.ece), "ece_per_batch": float(r.ece_per_batch),
                     "nll": float(r.nll), "brier": float(r.brier), "sigma_min": sigma_min(feats)}
    return out


@torch.no_grad()
def interpolate_(target: nn.Module, zs_state: dict[str, torch.Tensor], ft_state: dict[str, torch.Tensor],
                 alpha: float) -> nn.Module:
    """``target <- (1 - alpha) zs + alpha ft`` over every floating tensor of the state dicts (in place; integer
    buffers are taken from ``ft``). Returns ``target``."""
    _check_real("alpha", alpha)
    for name, t in target.state_dict(keep_vars=True).items():
        a, b = zs_state[name], ft_state[name]
        t = t.data if isinstance(t, nn.Parameter) else t
        if t.is_floating_point():
            t.copy_(a).lerp_(b.to(t.dtype), float(alpha))
        else:
            t.copy_(b)
    return target


def wise_ft(zero_shot: ImageClassifier, finetuned: ImageClassifier, alphas: Sequence[float],
            evaluate_fn: Callable[[ImageClassifier], dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """WiSE-FT sweep: for each alpha, the interpolated classifier is built **in place** in one preallocated copy
    (no checkpoint reloading) and ``evaluate_fn(classifier)`` is called. ``zero_shot`` and ``finetuned`` must have
    the same architecture (both from :func:`fit`: ``result.zero_shot``, ``result.classifier``)."""
    if zero_shot.normalize != finetuned.normalize:
        raise ValueError(f"zero_shot/finetuned: expected classifiers on the same features, got normalize="
                         f"{zero_shot.normalize} and {finetuned.normalize} (LP / LP-FT heads read raw features)")
    zs = {k: v.detach().clone() for k, v in zero_shot.state_dict().items()}
    ft = {k: v.detach().clone() for k, v in finetuned.state_dict().items()}
    if zs.keys() != ft.keys() or any(zs[k].shape != ft[k].shape for k in zs):
        raise ValueError("zero_shot/finetuned: expected classifiers of the same architecture (same state-dict keys "
                         "and shapes)")
    work = copy.deepcopy(finetuned).eval()
    out = []
    for a in alphas:
        interpolate_(work, zs, ft, a)
        out.append((float(a), evaluate_fn(work)))
    return out


def digit_splits(n: int = 1000, seed: int = 0, severity: int = 3) -> tuple[dict[str, Any], str, list[str]]:
    """The built-in evaluation world: ``(splits, id_name, ood_names)`` — ID ``spurious_mnist("test")`` and six
    shifts: scikit-learn's real digit scans and the five corruptions at ``severity``."""
    from vlmfast.data import CORRUPTIONS, corrupted_test, sklearn_digits, spurious_mnist

    splits: dict[str, Any] = {"id": spurious_mnist("test", n=n, seed=seed),
                              "sklearn-digits": sklearn_digits(n=n, seed=seed)}
    for kind in CORRUPTIONS:
        splits[f"{kind}-{severity}"] = corrupted_test(kind, severity, n=n, seed=seed)
    return splits, "id", [k for k in splits if k != "id"]


def format_results(rows: dict[str, dict[str, dict[str, float]]], id_split: str,
                   ood_splits: Sequence[str]) -> str:
    """A markdown table: per method ID accuracy/ECE and the OOD means (percent)."""
    head = "| method | ID acc | ID ECE | OOD acc | OOD ECE | OOD ECE (per-batch) | ID sigma_min |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for m, res in rows.items():
        ood = [res[s] for s in ood_splits]
        mean = lambda k: 100 * sum(r[k] for r in ood) / len(ood)  # noqa: E731
        lines.append(f"| {m} | {100 * res[id_split]['accuracy']:.2f} | {100 * res[id_split]['ece']:.2f} | "
                     f"{mean('accuracy'):.2f} | {mean('ece'):.2f} | {mean('ece_per_batch'):.2f} | "
                     f"{res[id_split]['sigma_min']:.4f} |")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=float)
