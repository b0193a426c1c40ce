"""ModelSpec: one model of a fleet, as a manifest lists it (JSON round trip, validated, buildable)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

_SPEC_VERSION = 1


def _check_json_value(v: Any, where: str) -> None:
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: expected a finite number (JSON has no NaN/inf), got {v!r}")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_json_value(x, f"{where}[{i}]")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: expected str keys, got {type(k).__name__} key {k!r}")
            _check_json_value(x, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: expected JSON values (None, bool, int, float, str, list, dict), got {type(v).__name__}")


@dataclass
class ModelSpec:
    """A model a fleet job builds, fine-tunes or audits.

    ``name``: unique label of this entry (e.g. ``"rn-tiny-ft-seed0"``). ``config``: the open_clip config name the
    architecture comes from (``vlmfast.models.list_models()``). ``checkpoint``: a vlmfast checkpoint path
    (``<path>`` / ``.safetensors``; see :func:`vlmfast.models.save_checkpoint`) or a ``.pt``/``.pth`` state dict,
    or None for the randomly initialised config. ``method``: how the weights came about ("random", "clip-pretrain",
    "coop", "flyp", ...). ``hyperparameters``: JSON values only. ``seed``: int >= 0. ``tags``: free-form labels.
    """

    name: str
    config: str
    checkpoint: str | None = None
    method: str = "random"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for attr in ("name", "config", "method"):
            v = getattr(self, attr)
            if not isinstance(v, str):
                raise TypeError(f"{attr}: expected a str, got {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"{attr}: expected a non-empty string, got {v!r}")
        if self.checkpoint is not None:
            if isinstance(self.checkpoint, os.PathLike):
                self.checkpoint = os.fspath(self.checkpoint)
            if not isinstance(self.checkpoint, str):
                raise TypeError(f"checkpoint: expected a path string or None, got {type(self.checkpoint).__name__}")
            if not self.checkpoint:
                raise ValueError("checkpoint: expected a path or None, got ''")
        if not isinstance(self.hyperparameters, dict):
            raise TypeError(f"hyperparameters: expected a dict, got {type(self.hyperparameters).__name__}")
        _check_json_value(self.hyperparameters, "hyperparameters")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")
        if self.seed < 0:
            raise ValueError(f"seed: expected >= 0, got {self.seed}")
        if isinstance(self.tags, str) or not isinstance(self.tags, (list, tuple)):
            raise TypeError(f"tags: expected a list of str, got {type(self.tags).__name__}")
        for i, t in enumerate(self.tags):
            if not isinstance(t, str):
                raise TypeError(f"tags[{i}]: expected a str, got {type(t).__name__}")
        self.tags = list(self.tags)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; ``from_dict(to_dict())`` gives an equal spec."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["hyperparameters"] = json.loads(json.dumps(self.hyperparameters))
        out["tags"] = list(self.tags)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of :meth:`to_dict`. Unknown keys and missing required keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"d: unknown ModelSpec keys {unknown}; expected a subset of {sorted(names)}")
        missing = [k for k in ("name", "config") if k not in d]
        if missing:
            raise ValueError(f"d: missing required ModelSpec keys {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))

    def build(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """The model: from ``checkpoint`` if set (its card's config must equal ``config``), else ``config`` with
        random weights (``pretrained=None``). Eval mode."""
        from vlmfast.models.checkpoint import CheckpointError, load_checkpoint
        from vlmfast.models.factory import create_model

        if self.checkpoint is None:
            return create_model(self.config, pretrained=None, device=device)
        model, card = load_checkpoint(self.checkpoint, device=device, config=None if _has_card(self.checkpoint)
                                      else self.config)
        if card.get("config") not in (None, self.config):
            raise CheckpointError(
                f"{self.checkpoint}: checkpoint config {card.get('config')!r} differs from the spec's config "
                f"{self.config!r} (spec {self.name!r})"
            )
        return model


def _has_card(path: str) -> bool:
    from vlmfast.models.checkpoint import checkpoint_paths

    return checkpoint_paths(path)[1].is_file()
