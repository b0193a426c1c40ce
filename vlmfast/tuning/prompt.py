"""Prompt tuning of a frozen CLIP: CoOp, CoCoOp and KgCoOp, each with an optional DOR (dynamic outlier
regularisation) term, the base-to-new protocol with calibration metrics, and safe save/load.

Method spec: ``shared/specs/methods_prompt_calibration.md`` (§1 CoOp, §2 KgCoOp, §3 DOR, §7 speed-up plan).

**Prompts.** Class ``i`` gets ``[SOS] v_1 .. v_M <name tokens> . [EOT]`` where ``v`` is the learned context
(unified ``(M, D)`` or class-specific ``(C, M, D)``, ``csc=True``) and ``D`` the text tower's width. As in the
reference, the prompt "X X ... X <name>." (or "<init phrase> <name>.") is tokenised once; ``token_prefix`` (the
SOS embedding) and ``token_suffix`` (the embeddings of the name, '.', EOT and padding) are computed once, without
gradients; every forward concatenates ``prefix, ctx, suffix``. ``class_token_position`` "middle" / "front" is a
per-row permutation of those positions (a ``gather``), so every layout, every class count and the outliers go
through one batched text-encoder call. The text tower runs on the exact EOT-truncated path of
:mod:`vlmfast.models.text` (``encode_truncated(parts, tokens, embeddings=...)``): only ``max EOT + 1`` positions.

**Methods.**

* ``"coop"``: CE over the C class prompts (default M = 16, random N(0, 0.02^2) context).
* ``"cocoop"``: a meta-net ``Linear(vis, vis // 16) - ReLU - Linear(-, D)`` maps each L2-normalised image
  feature to a bias added to the context; the ``B x C`` instance prompts of a batch are encoded in one call and each
  image is scored against its own C class features (default M = 4, init "a photo of a").
* ``"kgcoop"``: CE + ``lam * (1 - mean_i cos(w_i, w_i^clip))`` with ``lam = 8``; ``w^clip`` = the same model's
  zero-shot features of ``kg_template`` (default "a photo of a {}."), computed once (no second model copy).
  Default M = 4, init "a photo of a".
* ``dor=True`` (any method): an outlier pool (:func:`outlier_pool`: the top-K vocabulary words by mean cosine to
  the base classes' zero-shot features, base and new class names excluded) is encoded once; each step draws
  ``dor_batch`` outliers (default C) from ``vlmfast.train.step_generator(seed, step, "dor")`` and adds
  ``dor_lam * (1 - mean cos(tuned outlier feature, frozen zero-shot outlier feature))`` (``dor_lam`` 8 for CoOp,
  2 for the others). CoOp/KgCoOp encode the outlier prompts in the same call as the class prompts. CoCoOp applies
  the **mean** of the batch's instance biases to the outlier context (the reference uses the last image's; the
  mean costs one prompt per outlier instead of one per image and outlier). With ``csc=True`` the outliers get the
  mean of the class contexts.

**Deviations from the reference** (documented choices): the optimizer is AdamW (our engine's; the reference uses
SGD, momentum 0.9, weight decay 5e-4) with linear warm-up then cosine decay; the image tower is frozen, so the image
features of the training images are computed **once** (augmentation off: the spec's §7.7 option; the reference
re-augments every epoch); the outlier pool keeps its pre-tokenised prompt ids on the device and looks up the
(frozen) token embeddings of the drawn rows each step — the same values as precomputed suffix embeddings, with
``D`` times less memory; training length is a number of steps.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmfast._cache import atomic_target, atomic_write_bytes, cache_dir, content_digest, stable_hash
from vlmfast.models.text import (
    _model_device,
    _output_dim,
    encode_text,
    encode_truncated,
    eot_positions,
    text_parts,
    tokenize,
    weights_hash,
)

METHODS = ("coop", "cocoop", "kgcoop")
POSITIONS = ("end", "middle", "front")
EXCLUDES = ("base+new", "base")
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_INIT = "a photo of a"
#: per-method defaults of the context (``n_ctx``, ``ctx_init``) when neither is given
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "coop": {"n_ctx": 16, "ctx_init": None},
    "cocoop": {"n_ctx": 4, "ctx_init": DEFAULT_INIT},
    "kgcoop": {"n_ctx": 4, "ctx_init": DEFAULT_INIT},
}
KG_LAM = 8.0
DOR_LAM = {"coop": 8.0, "cocoop": 2.0, "kgcoop": 2.0}
DOR_K = 5000
FORMAT = "vlmfast-prompt-learner"
FORMAT_VERSION = 1
VOCAB_FORMAT_VERSION = 1
_EVAL_ROWS = 4096  # CoCoOp evaluation: images per chunk x classes

__all__ = [
    "DEFAULT_TEMPLATE", "METHODS", "OutlierPool", "PromptLearner", "base_to_new_split", "evaluate_base_to_new",
    "fit", "format_base_to_new", "load_prompt_learner", "outlier_pool", "prompt_loss",
]


# ----------------------------------------------------------------------------------------------------------
# Loss: the lead's fused op when present, else the reference formula
# ----------------------------------------------------------------------------------------------------------


def _fallback_prompt_ce(image_features, text_features, logit_scale, labels, *, label_smoothing=0.0,
                        reduction="mean", backend=None):
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)


def _prompt_logits_loss() -> Callable[..., torch.Tensor]:
    try:
        from vlmfast.functional import prompt_logits_loss
    except ImportError:
        return _fallback_prompt_ce
    return prompt_logits_loss


def prompt_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Any,
                labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``logit_scale * cos(image, text)`` logits (``logit_scale`` the multiplier, features
    unnormalised): :func:`vlmfast.functional.prompt_logits_loss` when this installation has it, else the same formula
    in plain torch."""
    return _prompt_logits_loss()(image_features, text_features, logit_scale, labels)


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_names(name: str, values: Any, allow_empty: bool = False) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of str, got {type(values).__name__}")
    out = list(values)
    if not out and not allow_empty:
        raise ValueError(f"{name}: expected at least one class name, got an empty list")
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise TypeError(f"{name}[{i}]: expected a str, got {type(c).__name__}")
        if not c.strip():
            raise ValueError(f"{name}[{i}]: expected a non-empty class name, got {c!r}")
    low = [c.strip().lower() for c in out]
    dup = sorted({c for c in low if low.count(c) > 1})
    if dup:
        raise ValueError(f"{name}: class names must be distinct (case-insensitive), got duplicates {dup[:5]}")
    return out


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _check_real(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name}: expected a finite float >= {low}, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# Prompt rows
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Prompts of a set of names: token ids cut to ``L = max EOT + 1`` (they give the EOT positions), the
    embeddings after the context (None: looked up on demand), and the layout permutation (None: "end")."""

    names: list[str]
    tokens: torch.Tensor  # (N, L) int64
    suffix: torch.Tensor | None  # (N, L - 1 - M, D)
    perm: torch.Tensor | None  # (N, L) int64
    name_lens: torch.Tensor  # (N,)

    def select(self, idx: torch.Tensor) -> "_Rows":
        return _Rows([], self.tokens[idx], None if self.suffix is None else self.suffix[idx],
                     None if self.perm is None else self.perm[idx], self.name_lens[idx])


def _layout(name_lens: torch.Tensor, n_ctx: int, length: int, position: str) -> torch.Tensor | None:
    """Per-row source positions (N, L) that turn the "end" layout ``[SOS, ctx, name, rest]`` into ``position``'s:
    front ``[SOS, name, ctx, rest]``, middle ``[SOS, ctx[:M//2], name, ctx[M//2:], rest]``."""
    if position == "end":
        return None
    rows = []
    m = n_ctx
    for n in name_lens.tolist():
        name = list(range(1 + m, 1 + m + n))
        rest = list(range(1 + m + n, length))
        if position == "front":
            order = [0] + name + list(range(1, 1 + m)) + rest
        else:
            h = m // 2
            order = [0] + list(range(1, 1 + h)) + name + list(range(1 + h, 1 + m)) + rest
        rows.append(order)
    return torch.tensor(rows, dtype=torch.long)


class PromptLearner(nn.Module):
    """Learned prompt context for a frozen open_clip model (module docstring).

    ``model``: an open_clip model with a truncatable causal text tower (:func:`vlmfast.models.text.text_parts`;
    ValueError otherwise). Its parameters are frozen (``requires_grad_(False)``) and it is put in eval mode; it is
    referenced, not registered, so the learner's ``state_dict`` holds only ``ctx`` (and ``meta_net.*`` for CoCoOp).
    ``classnames``: the classes to train on. ``method``: "coop" | "cocoop" | "kgcoop". ``n_ctx`` / ``ctx_init``:
    context length and init phrase (``ctx_init`` sets ``n_ctx`` to its token count and copies its token
    embeddings; with ``csc=True`` every class starts from the phrase); None for both gives the method's defaults
    (:data:`METHOD_DEFAULTS`). ``csc``: class-specific context. ``class_token_position``: "end" | "middle" |
    "front". ``kg_template``: KgCoOp's hand-crafted template. ``seed``: the random init.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        *,
        method: str = "coop",
        n_ctx: int | None = None,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        kg_template: str = DEFAULT_TEMPLATE,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        from vlmfast.models.factory import get_tokenizer
        from vlmfast.train import step_seed

        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an open_clip model (torch.nn.Module), got {type(model).__name__}")
        parts = text_parts(model)
        if parts is None:
            raise ValueError(
                f"model: prompt tuning needs an open_clip CLIP/CustomTextCLIP with a causal argmax/eos-pooled text "
                f"transformer (vlmfast.models.text.text_parts); {type(model).__name__} has none"
            )
        self.method = _check_choice("method", method, METHODS)
        self.classnames = _check_names("classnames", classnames)
        self.class_token_position = _check_choice("class_token_position", class_token_position, POSITIONS)
        if not isinstance(csc, bool):
            raise TypeError(f"csc: expected a bool, got {type(csc).__name__}")
        if ctx_init is not None and (not isinstance(ctx_init, str) or not ctx_init.strip()):
            raise ValueError(f"ctx_init: expected a non-empty phrase or None, got {ctx_init!r}")
        if not isinstance(kg_template, str) or "{}" not in kg_template:
            raise ValueError(f"kg_template: expected a str with one '{{}}' for the class name, got {kg_template!r}")
        _check_int("seed", seed, 0)
        if n_ctx is None and ctx_init is None:
            n_ctx, ctx_init = METHOD_DEFAULTS[self.method]["n_ctx"], METHOD_DEFAULTS[self.method]["ctx_init"]
        model.requires_grad_(False)
        model.eval()
        self._model = (model,)  # a tuple: not registered as a submodule
        self._parts = parts
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer(model)
        self.context_length = int(parts.positional_embedding.shape[0])
        self.csc, self.kg_template, self.seed = csc, kg_template, seed
        device = parts.positional_embedding.device
        emb_w = parts.token_embedding.weight
        self.ctx_dim = int(emb_w.shape[1])
        self.out_dim = int(_output_dim(model))
        self.vis_dim = int(getattr(getattr(model, "visual", None), "output_dim", 0) or self.out_dim)

        if ctx_init is not None:
            phrase = " ".join(ctx_init.split())
            tok = tokenize([phrase], self.tokenizer)
            m = int(eot_positions(tok, parts.pool_type, parts.eos_id)[0]) - 1
            if m < 1:
                raise ValueError(f"ctx_init: {ctx_init!r} tokenises to no tokens")
            if n_ctx is not None and n_ctx != m:
                raise ValueError(f"n_ctx: ctx_init {ctx_init!r} has {m} tokens, so n_ctx must be {m} or None, "
                                 f"got {n_ctx!r}")
            with torch.no_grad():
                init = parts.token_embedding(tok.to(device))[0, 1:1 + m].float().clone()
            self.n_ctx, self.ctx_init, self.prompt_prefix = m, phrase, phrase
            vectors = init.expand(len(self.classnames), -1, -1).clone() if csc else init
        else:
            self.n_ctx = _check_int("n_ctx", n_ctx, 1)
            self.ctx_init, self.prompt_prefix = None, " ".join(["X"] * self.n_ctx)
            g = torch.Generator().manual_seed(step_seed(seed, 0, "ctx"))
            shape = (len(self.classnames), self.n_ctx, self.ctx_dim) if csc else (self.n_ctx, self.ctx_dim)
            vectors = torch.randn(shape, generator=g) * 0.02
        self.ctx = nn.Parameter(vectors.to(device=device, dtype=torch.float32))
        if self.method == "cocoop":
            hidden = max(1, self.vis_dim // 16)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(seed, 0, "meta_net"))
                net = nn.Sequential(nn.Linear(self.vis_dim, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, self.ctx_dim))
            self.meta_net = net.to(device)
        else:
            self.meta_net = None
        with torch.no_grad():
            sos = parts.token_embedding(tokenize([""], self.tokenizer)[:, :1].to(device)).float()
        self.register_buffer("token_prefix", sos, persistent=False)  # (1, 1, D)
        rows = self._build_rows(self.classnames, "classnames", with_suffix=True)
        self._class_rows = rows
        self.register_buffer("token_suffix", rows.suffix, persistent=False)
        self._rows_cache: dict[tuple[str, ...], _Rows] = {}
        if self.method == "kgcoop":
            from vlmfast.models.text import zero_shot_head

            kg = zero_shot_head(model, self.classnames, [kg_template], tokenizer=self.tokenizer)
            self.register_buffer("kg_features", kg.float(), persistent=False)
        else:
            self.kg_features = None
        self.pool: OutlierPool | None = None
        self._pool_rows: _Rows | None = None
        self.train_log: dict[str, Any] = {}
        self.hparams: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------------- basics

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's logit multiplier ``exp(logit_scale)`` (frozen), a 0-d float32 tensor."""
        s = getattr(self.model, "logit_scale", None)
        if s is None:
            return torch.tensor(100.0, device=self.ctx.device)
        return s.detach().float().exp()

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, n_cls={self.n_cls}, n_ctx={self.n_ctx}, csc={self.csc}, "
                f"position={self.class_token_position!r}, ctx_init={self.ctx_init!r}")

    def _build_rows(self, names: list[str], what: str, *, with_suffix: bool, skip_overflow: bool = False) -> _Rows:
        """Tokenise ``"<prefix> <name>."`` for every name (cached), check the context length, and compute the
        (frozen) suffix embeddings if asked."""
        parts, tok = self._parts, self.tokenizer
        prompts = [f"{self.prompt_prefix} {n}." for n in names]
        tokens = tokenize(prompts, tok)
        eot = eot_positions(tokens, parts.pool_type, parts.eos_id)
        name_eot = eot_positions(tokenize(list(names), tok), parts.pool_type, parts.eos_id)
        name_lens = name_eot - 1
        ctx = self.context_length
        over = []
        encode = getattr(tok, "encode", None)
        for i in torch.nonzero(eot >= min(ctx, tokens.shape[1]) - 1).flatten().tolist():
            needed = len(encode(prompts[i])) + 2 if callable(encode) else None
            if needed is None or needed > min(ctx, tokens.shape[1]):
                over.append((i, needed))
        if over and not skip_overflow:
            i, needed = over[0]
            size = f"{needed} tokens" if needed is not None else "at least the whole context"
            shown = names[i] if len(names[i]) <= 60 else names[i][:57] + "..."
            raise ValueError(
                f"{what}[{i}]: the prompt of class {shown!r} (SOS + {self.n_ctx} context tokens + the name + '.' + "
                f"EOT) needs {size}, more than the model's context length {ctx}; shorten the class name or use "
                f"fewer context tokens ({len(over)} name(s) too long)"
            )
        keep = torch.ones(len(names), dtype=torch.bool)
        for i, _ in over:
            keep[i] = False
        if not keep.all():
            names = [n for n, k in zip(names, keep.tolist()) if k]
            tokens, eot, name_lens = tokens[keep], eot[keep], name_lens[keep]
        if len(names) == 0:
            raise ValueError(f"{what}: every prompt exceeds the context length {ctx}")
        length = int(eot.max()) + 1
        tokens = tokens[:, :length].contiguous()
        perm = _layout(name_lens, self.n_ctx, length, self.class_token_position)
        device = self.ctx.device if hasattr(self, "ctx") else parts.positional_embedding.device
        suffix = None
        if with_suffix:
            with torch.no_grad():
                suffix = parts.token_embedding(tokens[:, 1 + self.n_ctx:].to(device)).float()
        return _Rows(list(names), tokens.to(device), suffix, None if perm is None else perm.to(device),
                     name_lens.to(device))

    def _rows_for(self, classnames: Sequence[str] | None) -> tuple[_Rows, bool]:
        """(rows, is_the_training_set) for ``classnames`` (None: the training classes)."""
        if classnames is None or list(classnames) == self.classnames:
            rows = self._class_rows
            rows.suffix = self.token_suffix  # follows .to(device)
            return rows, True
        names = _check_names("classnames", classnames)
        if self.csc:
            raise ValueError(
                f"classnames: a class-specific context (csc=True) exists only for the {self.n_cls} training classes "
                f"{self.classnames[:5]}{'...' if self.n_cls > 5 else ''}; it cannot be transferred to other classes "
                f"({names[:5]}); train with csc=False for base-to-new"
            )
        key = tuple(names)
        if key not in self._rows_cache:
            if len(self._rows_cache) >= 8:
                self._rows_cache.pop(next(iter(self._rows_cache)))
            self._rows_cache[key] = self._build_rows(names, "classnames", with_suffix=True)
        return self._rows_cache[key], False

    # -------------------------------------------------------------------------------------------------- encoding

    def _embed(self, ctx_rows: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Input embeddings (N, L, D) of ``rows`` with context ``ctx_rows`` (N, M, D)."""
        n = rows.tokens.shape[0]
        suffix = rows.suffix
        if suffix is None:
            with torch.no_grad():
                suffix = self._parts.token_embedding(rows.tokens[:, 1 + self.n_ctx:]).float()
        x = torch.cat([self.token_prefix.expand(n, -1, -1).to(ctx_rows.dtype), ctx_rows, suffix.to(ctx_rows.dtype)],
                      dim=1)
        if rows.perm is not None:
            x = torch.gather(x, 1, rows.perm[..., None].expand(-1, -1, x.shape[-1]))
        return x

    def _encode(self, groups: list[tuple[torch.Tensor, _Rows]]) -> list[torch.Tensor]:
        """Encode several (ctx_rows, rows) groups in ONE text-tower call; unnormalised features per group."""
        embs = [self._embed(c, r) for c, r in groups]
        toks = [r.tokens for _, r in groups]
        length = max(t.shape[1] for t in toks)
        if len(groups) > 1:
            # positions after a row's EOT never reach its EOT output (causal mask): pad with zeros
            embs = [F.pad(e, (0, 0, 0, length - e.shape[1])) for e in embs]
            toks = [F.pad(t, (0, length - t.shape[1])) for t in toks]
        feats = encode_truncated(self._parts, torch.cat(toks), torch.cat(embs))
        return list(torch.split(feats, [t.shape[0] for t in toks]))

    def _class_ctx(self, rows: _Rows, train_set: bool) -> torch.Tensor:
        n = rows.tokens.shape[0]
        if self.csc:
            return self.ctx
        return self.ctx.unsqueeze(0).expand(n, -1, -1)

    def instance_bias(self, image_features: torch.Tensor) -> torch.Tensor:
        """CoCoOp's meta-net bias ``pi(x)`` (B, D) of (L2-normalised) image features."""
        if self.meta_net is None:
            raise ValueError(f"image_features: only method='cocoop' has an instance-conditioned context; this learner "
                             f"is {self.method!r}")
        x = F.normalize(image_features.float(), dim=-1)
        return self.meta_net(x)

    def text_features(self, classnames: Sequence[str] | None = None, image_features: torch.Tensor | None = None,
                      *, outliers: torch.Tensor | None = None):
        """Class text features (unnormalised): ``(C, D_out)`` for CoOp/KgCoOp, ``(B, C, D_out)`` for CoCoOp (given
        ``image_features`` (B, vis)). ``classnames``: other classes (new ones) with the learned context (unified
        context only). ``outliers``: indices into the outlier pool; then returns ``(class_features,
        outlier_features)`` from the same text-encoder call."""
        rows, train_set = self._rows_for(classnames)
        n = rows.tokens.shape[0]
        groups: list[tuple[torch.Tensor, _Rows]] = []
        if self.method == "cocoop":
            if image_features is None:
                raise ValueError("image_features: CoCoOp's class features depend on the image; pass the (B, vis) "
                                 "image features")
            bias = self.instance_bias(image_features)  # (B, D)
            b = bias.shape[0]
            ctx = self.ctx if self.csc else self.ctx.unsqueeze(0)  # (C|1, M, D)
            inst = (ctx.unsqueeze(0) + bias[:, None, None, :]).expand(b, n, -1, -1).reshape(b * n, self.n_ctx, -1)
            rep = _Rows([], rows.tokens.repeat(b, 1), rows.suffix.repeat(b, 1, 1),
                        None if rows.perm is None else rows.perm.repeat(b, 1), rows.name_lens.repeat(b))
            groups.append((inst, rep))
        else:
            if image_features is not None:
                raise ValueError(f"image_features: method {self.method!r} has no instance-conditioned context; "
                                 "pass None")
            groups.append((self._class_ctx(rows, train_set), rows))
        if outliers is not None:
            orows = self._outlier_rows(outliers)
            k = orows.tokens.shape[0]
            base = self.ctx.mean(0) if self.csc else self.ctx  # CSC: outliers get the mean class context
            if self.method == "cocoop":
                base = base + bias.mean(0)[None, :]  # mean of the batch's instance biases (documented)
            groups.append((base.unsqueeze(0).expand(k, -1, -1), orows))
        feats = self._encode(groups)
        cls = feats[0]
        if self.method == "cocoop":
            cls = cls.view(b, n, -1)
        return (cls, feats[1]) if outliers is not None else cls

    def forward(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Text features of the training classes (see :meth:`text_features`)."""
        return self.text_features(None, image_features)

    def logits(self, image_features: torch.Tensor, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """``logit_scale * cos(image, class text)`` logits (B, C) of image features against ``classnames``
        (default the training classes); CoCoOp in chunks of images (``B x C`` prompts per chunk). Gradients as the
        caller's grad mode allows."""
        x = image_features.to(self.ctx.device).float()
        scale = self.logit_scale
        if self.method != "cocoop":
            w = F.normalize(self.text_features(classnames), dim=-1)
            return scale * F.normalize(x, dim=-1) @ w.T
        n = len(self.classnames if classnames is None else classnames)
        chunk = max(1, _EVAL_ROWS // max(1, n))
        out = []
        for s in range(0, x.shape[0], chunk):
            xb = x[s:s + chunk]
            w = F.normalize(self.text_features(classnames, xb), dim=-1)
            out.append(scale * torch.einsum("bd,bcd->bc", F.normalize(xb, dim=-1), w))
        return torch.cat(out) if out else x.new_zeros(0, n)

    # -------------------------------------------------------------------------------------------------- DOR

    def set_outlier_pool(self, pool: "OutlierPool") -> None:
        """Attach an outlier pool (:func:`outlier_pool`): its words are tokenised once with this learner's prefix
        (ids kept on the device; names whose prompt would exceed the context are dropped) and its frozen features
        moved to the device."""
        if not isinstance(pool, OutlierPool):
            raise TypeError(f"pool: expected an OutlierPool (vlmfast.tuning.prompt.outlier_pool), got "
                            f"{type(pool).__name__}")
        if pool.features.shape[1] != self.out_dim:
            raise ValueError(f"pool: features have dimension {pool.features.shape[1]}, the model's text features "
                             f"{self.out_dim}")
        rows = self._build_rows(list(pool.words), "pool.words", with_suffix=False, skip_overflow=True)
        kept = set(rows.names)
        keep = [i for i, w in enumerate(pool.words) if w in kept]
        feats = pool.features[keep] if len(keep) != len(pool.words) else pool.features
        self.pool = OutlierPool(rows.names, feats, pool.scores[keep] if pool.scores is not None else None,
                                pool.excluded, pool.template)
        self._pool_rows = rows
        self.register_buffer("pool_features", F.normalize(feats.float(), dim=-1).to(self.ctx.device),
                             persistent=False)

    def sample_outliers(self, seed: int, step: int, batch: int) -> torch.Tensor:
        """Indices (batch,) into the pool for one step: a pure function of ``(seed, step)``
        (``step_generator(seed, step, "dor")``; without replacement when ``batch <= K``)."""
        from vlmfast.train import step_generator

        if self._pool_rows is None:
            raise ValueError("dor: no outlier pool attached (set_outlier_pool)")
        k = self._pool_rows.tokens.shape[0]
        g = step_generator(seed, step, "dor")
        idx = torch.randperm(k, generator=g)[:batch] if batch <= k else torch.randint(k, (batch,), generator=g)
        return idx.to(self.ctx.device)

    def _outlier_rows(self, idx: torch.Tensor) -> _Rows:
        if self._pool_rows is None:
            raise ValueError("outliers: no outlier pool attached (set_outlier_pool)")
        rows = self._pool_rows.select(idx)
        eot = eot_positions(rows.tokens, self._parts.pool_type, self._parts.eos_id)
        length = int(eot.max()) + 1
        return _Rows([], rows.tokens[:, :length], None, None if rows.perm is None else rows.perm[:, :length],
                     rows.name_lens)

    @staticmethod
    def dor_term(tuned: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        """``1 - mean cos(tuned, frozen)`` (eps 1e-7 as the reference's ``CosineSimilarity``)."""
        return 1.0 - F.cosine_similarity(tuned.float(), frozen.float(), dim=-1, eps=1e-7).mean()

    def kg_term(self, class_features: torch.Tensor) -> torch.Tensor:
        """KgCoOp's ``1 - mean_i cos(w_i, w_i^clip)`` over the training classes."""
        if self.kg_features is None:
            raise ValueError(f"kg: only method='kgcoop' has knowledge features; this learner is {self.method!r}")
        return 1.0 - F.cosine_similarity(class_features.float(), self.kg_features, dim=-1, eps=1e-7).mean()

    # -------------------------------------------------------------------------------------------------- I/O

    def card(self) -> dict[str, Any]:
        from vlmfast._version import __version__
        from vlmfast.models.factory import model_config

        cfg = model_config(self.model)
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "vlmfast_version": __version__,
            "method": self.method, "classnames": list(self.classnames), "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init, "csc": self.csc, "class_token_position": self.class_token_position,
            "kg_template": self.kg_template, "seed": self.seed, "ctx_dim": self.ctx_dim, "out_dim": self.out_dim,
            "vis_dim": self.vis_dim, "context_length": self.context_length,
            "config": cfg["name"] if cfg else None, "model_weights_hash": weights_hash(self.model),
            "hparams": dict(self.hparams), "metrics": dict(self.train_log.get("metrics", {})),
            "dor_pool": None if self.pool is None else {"size": len(self.pool.words), "excluded": self.pool.excluded,
                                                         "template": self.pool.template,
                                                         "first_words": list(self.pool.words[:20])},
        }

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``<path>.safetensors`` (``ctx``, ``meta_net.*``) and ``<path>.json`` (the card: method, classes,
        context settings, model config and weights hash, hyper-parameters, training metrics, ``extra``); both
        atomically, the card last. Returns the weights path."""
        from safetensors.torch import save_file

        from vlmfast.models.checkpoint import checkpoint_paths, json_safe
        from vlmfast.models.weights import sha256_file

        weights_path, card_path = checkpoint_paths(path)
        if weights_path.suffix != ".safetensors":
            raise ValueError(f"path: a prompt learner is written as safetensors; got {str(path)!r}")
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in self.state_dict().items()}
        with atomic_target(weights_path) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT, "method": self.method})
            digest = sha256_file(tmp)
        card = self.card()
        card.update(extra or {})
        card["weights_file"], card["weights_sha256"] = weights_path.name, digest
        text = json.dumps(json_safe(card), indent=2, sort_keys=True, allow_nan=False)
        atomic_write_bytes(card_path, (text + "\n").encode())
        return weights_path


def load_prompt_learner(path: str | os.PathLike, model: nn.Module, *, strict: bool = True,
                        model_hash: str | None = None) -> PromptLearner:
    """A :class:`PromptLearner` saved by :meth:`PromptLearner.save`, rebuilt on ``model`` (safetensors only, never
    a pickle). The card is checked against the model: a different text width / output dimension / context length
    raises ValueError; with ``strict`` so does a different open_clip config name; different weights (same config)
    only warn. The weights' SHA-256 is checked against the card. ``model_hash``: ``weights_hash(model)`` when the
    caller has it already (many learners on one backbone), else computed here."""
    from safetensors.torch import load_file

    from vlmfast.models.checkpoint import checkpoint_paths
    from vlmfast.models.factory import model_config
    from vlmfast.models.weights import sha256_file

    weights_path, card_path = checkpoint_paths(path)
    for p in (weights_path, card_path):
        if not p.is_file():
            raise FileNotFoundError(f"path: {p} not found (a prompt learner is <path>.safetensors + <path>.json)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{card_path}: not a valid JSON card ({e})") from e
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ValueError(f"{card_path}: expected a {FORMAT!r} card, got format "
                         f"{card.get('format') if isinstance(card, dict) else type(card).__name__!r}")
    parts = text_parts(model)
    if parts is None:
        raise ValueError(f"model: {type(model).__name__} has no truncatable text tower; cannot host a prompt learner")
    have = {"ctx_dim": int(parts.token_embedding.weight.shape[1]), "out_dim": int(_output_dim(model)),
            "context_length": int(parts.positional_embedding.shape[0])}
    for key, val in have.items():
        if card.get(key) is not None and int(card[key]) != val:
            raise ValueError(f"model: the learner in {card_path} was trained with {key} = {card[key]}, this model "
                             f"has {key} = {val}")
    cfg = model_config(model)
    if strict and card.get("config") and cfg and cfg.get("name") and cfg["name"] != card["config"]:
        raise ValueError(f"model: the learner in {card_path} was trained on config {card['config']!r}, this model "
                         f"is {cfg['name']!r} (strict=False to load anyway)")
    digest = sha256_file(weights_path)
    if card.get("weights_sha256") and digest != card["weights_sha256"]:
        raise ValueError(f"{weights_path}: SHA-256 {digest[:12]}... does not match the card's "
                         f"{card['weights_sha256'][:12]}... (truncated, corrupt or replaced)")
    learner = PromptLearner(model, card["classnames"], method=card["method"],
                            n_ctx=None if card.get("ctx_init") else card["n_ctx"], ctx_init=card.get("ctx_init"),
                            csc=bool(card["csc"]), class_token_position=card["class_token_position"],
                            kg_template=card.get("kg_template", DEFAULT_TEMPLATE), seed=int(card.get("seed", 0)))
    state = load_file(str(weights_path))
    own = learner.state_dict()
    if set(state) != set(own):
        raise ValueError(f"{weights_path}: tensors {sorted(state)} do not match the learner's {sorted(own)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{weights_path}: {k!r} has shape {tuple(v.shape)}, the learner expects "
                             f"{tuple(own[k].shape)}")
    learner.load_state_dict({k: v.to(own[k].device) for k, v in state.items()})
    if card.get("model_weights_hash"):
        have_hash = model_hash if model_hash is not None else weights_hash(model)
        if card["model_weights_hash"] != have_hash:
            warnings.warn(f"{card_path}: the learner was trained on other weights of this config (hash "
                          f"{card['model_weights_hash']} vs {have_hash})", stacklevel=2)
    learner.hparams = dict(card.get("hparams") or {})
    learner.train_log = {"metrics": dict(card.get("metrics") or {})}
    learner.card_on_disk = card
    return learner


# ----------------------------------------------------------------------------------------------------------
# DOR outlier pool
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OutlierPool:
    """The DOR pool: ``words`` (K), their frozen zero-shot features ``features`` (K, D, L2-normalised) of
    ``template``, their scores (mean cosine to the base classes) and which names were excluded
    ("base+new" / "base")."""

    words: list[str]
    features: torch.Tensor
    scores: torch.Tensor | None = None
    excluded: str = "base+new"
    template: str = DEFAULT_TEMPLATE
    excluded_names: list[str] = field(default_factory=list)


def _vocab_features(model: nn.Module, words: list[str], template: str, *, cache: bool,
                    batch_size: int = 1024) -> torch.Tensor:
    """Zero-shot features (V, D) of ``template`` for every word, on the model's device; cached on disk under
    ``cache_dir("features")`` keyed by (weights hash, template, word list) when ``cache``."""
    path = None
    if cache:
        key = stable_hash({"weights": weights_hash(model), "template": template,
                           "words": stable_hash(words, 32), "v": VOCAB_FORMAT_VERSION})
        path = cache_dir("features") / f"vocab-{key}.safetensors"
        if path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    stored = (fh.metadata() or {}).get("sha256")
                    feats = fh.get_tensor("features")
                if stored == content_digest({"features": feats}) and feats.shape[0] == len(words):
                    return feats.to(_model_device(model))
            except Exception:  # a damaged entry is recomputed
                pass
    with torch.no_grad():
        feats = encode_text(model, [template.format(w) for w in words], normalize=True, batch_size=batch_size)
    if path is not None:
        from safetensors.torch import save_file

        cpu = feats.detach().cpu().contiguous()
        with atomic_target(path) as tmp:
            save_file({"features": cpu}, str(tmp), metadata={"sha256": content_digest({"features": cpu})})
    return feats


def outlier_pool(
    model: nn.Module,
    base_classnames: Sequence[str],
    *,
    new_classnames: Sequence[str] | None = None,
    exclude: str = "base+new",
    vocabulary: Sequence[str] | None = None,
    k: int = DOR_K,
    template: str = DEFAULT_TEMPLATE,
    cache: bool = True,
    batch_size: int = 1024,
) -> OutlierPool:
    """DOR's near-OOD outlier pool: the top-``k`` words of ``vocabulary`` (default
    :func:`vlmfast.data.noun_vocabulary`) by mean cosine between their zero-shot feature (``template``) and the base
    classes' zero-shot features; ``k`` is clipped to the number of candidates.

    Words equal (case-insensitive, surrounding space ignored) to a base class name — and, with ``exclude="base+new"``
    (default), to a ``new_classnames`` entry — are removed first. ``exclude="base"`` is the base-only variant (the
    reference's; it can leak new-class names into the pool). The vocabulary is encoded once, batched, without
    gradients (``cache=True``: on disk, keyed by weights, template and word list)."""
    base = _check_names("base_classnames", base_classnames)
    new = _check_names("new_classnames", new_classnames, allow_empty=True) if new_classnames is not None else []
    _check_choice("exclude", exclude, EXCLUDES)
    _check_int("k", k, 1)
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"template: expected a str with one '{{}}', got {template!r}")
    if vocabulary is None:
        from vlmfast.data import noun_vocabulary

        vocabulary = noun_vocabulary()
    if isinstance(vocabulary, str) or not isinstance(vocabulary, Sequence):
        raise TypeError(f"vocabulary: expected a list of str, got {type(vocabulary).__name__}")
    words = []
    seen = set()
    for i, w in enumerate(vocabulary):
        if not isinstance(w, str):
            raise TypeError(f"vocabulary[{i}]: expected a str, got {type(w).__name__}")
        w = w.strip()
        if w and w not in seen:
            seen.add(w)
            words.append(w)
    excluded_names = base + (new if exclude == "base+new" else [])
    banned = {c.strip().lower() for c in excluded_names}
    cand = [w for w in words if w.lower() not in banned]
    if not cand:
        raise ValueError(f"vocabulary: no candidate words left after excluding the class names ({len(words)} given)")
    with torch.no_grad():
        feats = _vocab_features(model, cand, template, cache=cache, batch_size=batch_size)
        from vlmfast.models.text import zero_shot_head

        base_feats = zero_shot_head(model, base, [template]).to(feats.device)
        scores = (feats @ base_feats.T).mean(dim=1)
        top = torch.topk(scores, min(k, len(cand))).indices
    return OutlierPool([cand[i] for i in top.tolist()], feats[top].float(), scores[top].float(), exclude, template,
                       excluded_names)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _train_arrays(train_data: Any) -> tuple[Any, torch.Tensor]:
    images = getattr(train_data, "images", None)
    labels = getattr(train_data, "labels", None)
    if images is None or labels is None:
        raise TypeError(f"train_data: expected a dataset with .images (uint8 (N, 3, H, W)) and .labels, got "
                        f"{type(train_data).__name__}")
    labels = torch.as_tensor(labels).long().flatten()
    if torch.as_tensor(images).shape[0] != labels.shape[0]:
        raise ValueError(f"train_data: {torch.as_tensor(images).shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("train_data: expected at least one training image, got none")
    return images, labels


def _select_shots(labels: torch.Tensor, classnames: list[str], shots: int | None, seed: int) -> torch.Tensor:
    from vlmfast.train import step_seed

    n_cls = len(classnames)
    if int(labels.min()) < 0 or int(labels.max()) >= n_cls:
        raise ValueError(f"train_data: labels must lie in [0, {n_cls}) for the {n_cls} classnames, got "
                         f"[{int(labels.min())}, {int(labels.max())}] (subset the data to the training classes "
                         "first, e.g. data.subset(...))")
    if shots is None:
        return torch.arange(labels.shape[0])
    _check_int("shots", shots, 1)
    g = torch.Generator().manual_seed(step_seed(seed, 0, "shots"))
    picked = []
    for c in range(n_cls):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < shots:
            raise ValueError(f"shots: expected at most {idx.numel()} (the training images of class {c} "
                             f"{classnames[c]!r}), got {shots}")
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:shots]])
    return torch.sort(torch.cat(picked)).values


def fit(
    model: nn.Module,
    train_data: Any,
    classnames: Sequence[str] | None = None,
    method: str = "coop",
    dor: bool = False,
    *,
    shots: int | None = None,
    n_ctx: int | None = None,
    ctx_init: str | None = None,
    csc: bool = False,
    class_token_position: str = "end",
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 0.002,
    weight_decay: float = 5e-4,
    warmup: int | float | None = None,
    seed: int = 0,
    lam: float | None = None,
    kg_template: str = DEFAULT_TEMPLATE,
    dor_lam: float | None = None,
    dor_k: int = DOR_K,
    dor_batch: int | None = None,
    dor_template: str = DEFAULT_TEMPLATE,
    vocabulary: Sequence[str] | None = None,
    exclude: str = "base+new",
    new_classnames: Sequence[str] | None = None,
    vocab_cache: bool = True,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    precision: str = "auto",
) -> PromptLearner:
    """Prompt-tune ``model`` (frozen) on ``train_data``; returns the fitted :class:`PromptLearner` with
    ``learner.train_log`` (losses, metrics history, elapsed time, final metrics) and ``learner.hparams``.

    ``train_data``: ``.images`` uint8 (N, 3, H, W) and ``.labels`` in ``[0, C)`` (e.g. ``spurious_mnist("train",
    n=..., strength=0, seed=...)`` subset to the base classes); ``classnames`` default ``train_data.classnames``.
    ``method``: "coop" | "cocoop" | "kgcoop"; ``dor``: add the DOR term. ``shots``: K images per class drawn with
    ``seed`` (None: all). ``n_ctx``, ``ctx_init``, ``csc``, ``class_token_position``, ``kg_template``: see
    :class:`PromptLearner`. ``lam``: KgCoOp weight (default 8). ``dor_lam`` (default 8 CoOp / 2 others), ``dor_k``
    (pool size, default 5000), ``dor_batch`` (outliers per step, default C), ``dor_template``, ``vocabulary``,
    ``exclude`` ("base+new" | "base"), ``new_classnames`` (the names to keep out of the pool; without them only the
    base names are excluded, and the card says so), ``vocab_cache``: see :func:`outlier_pool`.

    Optimisation: :func:`vlmfast.train.fit` — **AdamW** (the reference uses SGD with momentum 0.9), peak ``lr``,
    ``weight_decay`` 5e-4, linear warm-up (``warmup``; default one epoch, at most 10 % of ``steps``) then cosine
    decay, ``steps`` optimizer steps of ``batch_size`` images (clipped to the training-set size) drawn by
    :class:`vlmfast.train.EpochSampler`. The image tower is frozen, so every training image is encoded once
    (augmentation off). ``checkpoint_dir``: resumable checkpoints (every ``checkpoint_every`` steps and at the end);
    a rerun with the same settings resumes exactly (outliers are a function of (seed, step)). ``device``: move the
    model there first (default: where it is). ``precision``: the engine's ("auto": bf16 autocast on CUDA).
    """
    from vlmfast.models.factory import resolve_device
    from vlmfast.models.text import encode_images
    from vlmfast.train import EpochSampler, TrainConfig
    from vlmfast.train import fit as train_fit

    _check_choice("method", method, METHODS)
    if not isinstance(dor, bool):
        raise TypeError(f"dor: expected a bool, got {type(dor).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an open_clip model (torch.nn.Module), got {type(model).__name__}")
    images, labels = _train_arrays(train_data)
    if classnames is None:
        classnames = getattr(train_data, "classnames", None)
        if classnames is None:
            raise ValueError("classnames: train_data has no .classnames; pass classnames=[...]")
    classnames = _check_names("classnames", classnames)
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_real("lr", lr)
    lam = KG_LAM if lam is None else _check_real("lam", lam)
    dor_lam = DOR_LAM[method] if dor_lam is None else _check_real("dor_lam", dor_lam)
    _check_int("dor_k", dor_k, 1)
    if dor_batch is not None:
        _check_int("dor_batch", dor_batch, 1)
    _check_choice("exclude", exclude, EXCLUDES)
    if new_classnames is not None:
        new_classnames = _check_names("new_classnames", new_classnames, allow_empty=True)
    if lam != KG_LAM and method != "kgcoop":
        raise ValueError(f"lam: the knowledge-guided weight applies to method='kgcoop' only, got lam={lam} with "
                         f"method={method!r}")
    if device is not None:
        model.to(resolve_device(device))
    keep = _select_shots(labels, classnames, shots, seed)

    learner = PromptLearner(model, classnames, method=method, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc,
                            class_token_position=class_token_position, kg_template=kg_template, seed=seed)
    dev = learner.ctx.device
    subset = torch.as_tensor(images)[keep]
    feats = encode_images(model, subset).to(dev)
    ys = labels[keep].to(dev)
    n = feats.shape[0]
    bs = min(batch_size, n)
    sampler = EpochSampler(n, bs, seed=seed)
    excluded = exclude
    if dor:
        pool = outlier_pool(model, classnames, new_classnames=new_classnames, exclude=exclude,
                            vocabulary=vocabulary, k=dor_k, template=dor_template, cache=vocab_cache)
        if exclude == "base+new" and not new_classnames:
            excluded = "base (no new_classnames given)"
            pool.excluded = excluded
        learner.set_outlier_pool(pool)
    n_out = dor_batch if dor_batch is not None else len(classnames)
    scale = learner.logit_scale

    def batches(step: int) -> dict[str, Any]:
        return {"idx": sampler(step).to(dev), "step": step}

    def loss_fn(batch: dict[str, Any]) -> dict[str, Any]:
        x, y = feats[batch["idx"]], ys[batch["idx"]]
        out_idx = learner.sample_outliers(seed, batch["step"], n_out) if dor else None
        if method == "cocoop":
            res = learner.text_features(None, x, outliers=out_idx)
            cls, tuned = res if dor else (res, None)
            logits = scale * torch.einsum("bd,bcd->bc", F.normalize(x, dim=-1), F.normalize(cls.float(), dim=-1))
            ce = F.cross_entropy(logits, y)
        else:
            res = learner.text_features(None, outliers=out_idx)
            cls, tuned = res if dor else (res, None)
            ce = prompt_loss(x, cls.float(), scale, y)
        loss = ce
        out: dict[str, Any] = {"ce": ce.detach()}
        if method == "kgcoop":
            kg = learner.kg_term(cls)
            loss = loss + lam * kg
            out["kg"] = kg.detach()
        if dor:
            d = learner.dor_term(tuned, learner.pool_features[out_idx])
            loss = loss + dor_lam * d
            out["dor"] = d.detach()
        out["loss"] = loss
        return out

    per_epoch = max(1, n // bs)
    if warmup is None:
        warmup = min(per_epoch, steps // 10)
    config = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed,
                         checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every if checkpoint_dir is not None else None,
                         precision=precision, progress=progress, log_every=max(1, min(50, steps // 4 or 1)),
                         desc=f"{method}{'+dor' if dor else ''}")
    params = [{"params": [p for p in learner.parameters() if p.requires_grad], "name": "prompt"}]
    state = train_fit(learner, loss_fn, batches, config, params=params)
    final = {k: float(v) for k, v in state.last_metrics.items()}
    final["loss"] = state.losses[-1] if state.losses else math.nan
    learner.hparams = {
        "method": method, "dor": dor, "shots": shots, "n_train": n, "steps": steps, "batch_size": bs, "lr": lr,
        "weight_decay": weight_decay, "warmup": config.warmup_steps, "seed": seed, "optimizer": "AdamW",
        "schedule": "linear warm-up + cosine", "augmentation": "off (image features cached once)",
        "lam": lam if method == "kgcoop" else None, "kg_template": kg_template if method == "kgcoop" else None,
        "dor_lam": dor_lam if dor else None, "dor_k": dor_k if dor else None, "dor_batch": n_out if dor else None,
        "dor_template": dor_template if dor else None, "dor_exclude": excluded if dor else None,
        "precision": precision,
    }
    learner.train_log = {"losses": list(state.losses), "history": [dict(h) for h in state.history],
                         "elapsed_s": state.elapsed_s, "resumed_from": state.resumed_from, "metrics": final}
    return learner


# ----------------------------------------------------------------------------------------------------------
# Base-to-new protocol
# ----------------------------------------------------------------------------------------------------------


def base_to_new_split(classnames_or_c: Sequence[str] | int) -> tuple[list[int], list[int]]:
    """(base ids, new ids): class ids sorted, base = the first ceil(C / 2), new = the rest (CoCoOp's
    ``subsample_classes``)."""
    if _is_int(classnames_or_c):
        c = classnames_or_c
    elif isinstance(classnames_or_c, Sequence) and not isinstance(classnames_or_c, str):
        c = len(classnames_or_c)
    else:
        raise TypeError(f"classnames_or_c: expected a list of class names or an int, got "
                        f"{type(classnames_or_c).__name__}")
    if c < 2:
        raise ValueError(f"classnames_or_c: base-to-new needs at least 2 classes, got {c}")
    m = math.ceil(c / 2)
    return list(range(m)), list(range(m, c))


def evaluate_base_to_new(
    model: nn.Module,
    learner: PromptLearner | None,
    test_data: Any,
    classnames: Sequence[str] | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    n_bins: int = 10,
    convention: str = "standard",
    batch_size: int = 256,
    image_features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Base and new classes as two closed-set problems (labels re-indexed from 0), scored by ``learner`` (its
    learned context with each half's class names) or, for ``learner=None``, zero-shot with ``template``.

    Returns ``{"base": {...}, "new": {...}, "base_accuracy", "new_accuracy", "H"}`` where each half holds
    ``n``, ``classnames`` and every metric of :func:`vlmfast.metrics.calibration` (``n_bins`` 10, ``convention``)
    as floats, and ``H = 2BN / (B + N)`` of the accuracies. ``image_features``: precomputed (N, D) features of
    ``test_data`` (else encoded here)."""
    from vlmfast.metrics import calibration
    from vlmfast.models.text import encode_images, zero_shot_head

    if classnames is None:
        classnames = getattr(test_data, "classnames", None)
    classnames = _check_names("classnames", classnames)
    if learner is not None and not isinstance(learner, PromptLearner):
        raise TypeError(f"learner: expected a PromptLearner or None (zero-shot), got {type(learner).__name__}")
    if learner is not None and learner.model is not model:
        raise ValueError("learner: was built on another model object; pass the model it was trained with")
    if learner is not None and learner.csc:
        raise ValueError("learner: a class-specific context (csc=True) cannot be transferred to the new classes; "
                         "base-to-new needs csc=False")
    labels = torch.as_tensor(getattr(test_data, "labels")).long().flatten()
    base_ids, new_ids = base_to_new_split(classnames)
    if int(labels.min()) < 0 or int(labels.max()) >= len(classnames):
        raise ValueError(f"test_data: labels must lie in [0, {len(classnames)}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    dev = _model_device(model)
    if image_features is None:
        image_features = encode_images(model, test_data, batch_size=batch_size)
    feats = image_features.to(dev).float()
    labels = labels.to(dev)
    out: dict[str, Any] = {}
    for part, ids in (("base", base_ids), ("new", new_ids)):
        names = [classnames[i] for i in ids]
        remap = torch.full((len(classnames),), -1, dtype=torch.long, device=dev)
        remap[torch.tensor(ids, device=dev)] = torch.arange(len(ids), device=dev)
        y = remap[labels]
        mask = y >= 0
        x, y = feats[mask], y[mask]
        with torch.no_grad():
            if learner is None:
                head = zero_shot_head(model, names, [template]).to(dev)
                s = getattr(model, "logit_scale", None)
                scale = s.detach().float().exp() if s is not None else torch.tensor(100.0, device=dev)
                logits = scale * F.normalize(x, dim=-1) @ head.T
            else:
                logits = learner.logits(x, names)
        res: dict[str, Any] = {"n": int(y.numel()), "classnames": names}
        if y.numel():
            cal = calibration(logits.float(), y, n_bins, convention=convention)
            for m in cal.metric_names:
                res[m] = float(getattr(cal, m))
        else:
            res["accuracy"] = math.nan
        out[part] = res
    b, nw = out["base"]["accuracy"], out["new"]["accuracy"]
    out["base_accuracy"], out["new_accuracy"] = b, nw
    out["H"] = 2 * b * nw / (b + nw) if (b + nw) > 0 else 0.0
    return out


def format_base_to_new(rows: dict[str, dict[str, Any]], digits: int = 2, scale: float = 100.0) -> str:
    """A markdown table of :func:`evaluate_base_to_new` results, one row per name: accuracies, H, ECE / ACE / MCE
    for base and new (values x ``scale``)."""
    cols = [("base acc", "base", "accuracy"), ("new acc", "new", "accuracy"), ("H", None, "H"),
            ("base ECE", "base", "ece"), ("new ECE", "new", "ece"), ("base ACE", "base", "ace"),
            ("new ACE", "new", "ace"), ("base MCE", "base", "mce"), ("new MCE", "new", "mce")]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        vals = []
        for _, part, key in cols:
            v = r.get(key) if part is None else r.get(part, {}).get(key)
            vals.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
