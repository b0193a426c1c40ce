"""Parameter groups: per-group learning-rate scale and weight decay, chosen by parameter name.

``param_groups(model, rules)`` walks ``model.named_parameters()`` (trainable ones only) and puts each parameter in
the group of the first rule whose selector matches it; weight decay is then switched off for the parameters
``no_decay`` selects. A selector is a glob on the parameter name (``"visual.*"``), a tuple/list of globs, or a
callable ``(name, param) -> bool``. Each rule is ``(selector, options)`` with options a dict of ``lr_scale``
(multiplies :attr:`TrainConfig.lr`), ``weight_decay`` (overrides the config's) and ``name`` (a label), or just
a float ``lr_scale``.

    groups = param_groups(model, [(is_text_tower, 0.05)])   # text tower at 0.05x, the rest at 1x

The groups are torch optimizer groups (``{"params": [...], "lr_scale": s, "weight_decay": wd, "name": ...}``) and
go to :func:`vlmfast.train.fit` as ``params=``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence, Union

import torch

Selector = Union[str, Sequence[str], Callable[[str, torch.nn.Parameter], bool]]

# open_clip's joint-space scalars: neither tower's
_JOINT = ("logit_scale", "logit_bias")


def is_image_tower(name: str, param: Any = None) -> bool:
    """open_clip ``CLIP`` / ``CustomTextCLIP``: the image tower is everything under ``visual.``."""
    return name.startswith("visual.")


def is_text_tower(name: str, param: Any = None) -> bool:
    """open_clip ``CLIP`` / ``CustomTextCLIP``: everything that is neither the image tower nor the logit
    scale/bias (``transformer.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``,
    ``text_projection``, or ``text.*`` in ``CustomTextCLIP``)."""
    return not is_image_tower(name) and name not in _JOINT


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The usual exemptions from weight decay: biases, norm gains and every other tensor with fewer than 2 dims
    (the logit scale included), and embeddings: any name part ending in ``embedding`` (``token_embedding.weight``,
    ``positional_embedding``, ``visual.class_embedding``)."""
    return param.ndim < 2 or any(part.endswith("embedding") for part in name.split("."))


def _matcher(selector: Selector, where: str) -> Callable[[str, torch.nn.Parameter], bool]:
    if callable(selector):
        return selector
    if isinstance(selector, str):
        return lambda name, p: fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, (list, tuple)) and all(isinstance(s, str) for s in selector):
        pats = tuple(selector)
        return lambda name, p: any(fnmatch.fnmatchcase(name, s) for s in pats)
    raise TypeError(f"{where}: expected a glob string, a list of globs or a callable (name, param) -> bool, got "
                    f"{type(selector).__name__}")


def _options(opts: Any, where: str) -> dict[str, Any]:
    if isinstance(opts, (int, float)) and not isinstance(opts, bool):
        opts = {"lr_scale": float(opts)}
    if not isinstance(opts, dict):
        raise TypeError(f"{where}: expected a float lr_scale or a dict of lr_scale / weight_decay / name, got "
                        f"{type(opts).__name__}")
    unknown = sorted(set(opts) - {"lr_scale", "weight_decay", "name"})
    if unknown:
        raise ValueError(f"{where}: unknown options {unknown}; expected some of ['lr_scale', 'name', 'weight_decay']")
    for key in ("lr_scale", "weight_decay"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise ValueError(f"{where}: {key} expected a float >= 0, got {v!r}")
    return opts


def param_groups(
    model: torch.nn.Module,
    rules: Sequence[tuple[Selector, Any]] = (),
    *,
    no_decay: Callable[[str, torch.Tensor], bool] | None = no_weight_decay,
) -> list[dict[str, Any]]:
    """Optimizer groups of ``model``'s trainable parameters (module docstring). ``no_decay``: a selector of the
    parameters that get ``weight_decay=0`` (default :func:`no_weight_decay`; None decays every parameter, as
    FLYP/CaRot do). Parameters no rule matches form the default group (``lr_scale`` 1). Empty groups are left out;
    a model without trainable parameters raises ValueError."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(rules, (str, dict)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules: expected a sequence of (selector, options) pairs, got {type(rules).__name__}")
    parsed = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise TypeError(f"rules[{i}]: expected a (selector, options) pair, got {rule!r}")
        parsed.append((_matcher(rule[0], f"rules[{i}]"), _options(rule[1], f"rules[{i}]")))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        which = next((i for i, (match, _) in enumerate(parsed) if match(name, p)), len(parsed))
        opts = parsed[which][1] if which < len(parsed) else {}
        exempt = bool(no_decay is not None and no_decay(name, p))
        g = groups.get((which, exempt))
        if g is None:
            label = opts.get("name") or (f"rule{which}" if which < len(parsed) else "default")
            g = groups[(which, exempt)] = {
                "params": [], "lr_scale": float(opts.get("lr_scale", 1.0)),
                "weight_decay": 0.0 if exempt else opts.get("weight_decay"),
                "name": label + ("/no_decay" if exempt else ""),
            }
        g["params"].append(p)
    if not groups:
        raise ValueError("model: has no trainable parameters (every requires_grad is False)")
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        if g["weight_decay"] is None:
            del g["weight_decay"]  # the optimizer's default: TrainConfig.weight_decay
    return out
