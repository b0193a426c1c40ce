"""Safe checkpoints: safetensors weights + a JSON card, and checked loading of foreign state dicts.

A checkpoint ``<path>`` is two files written atomically (temporary file + rename; the card last, so a card on disk
means its weights are complete):

* ``<path>.safetensors``: the model's ``state_dict`` (float tensors as stored; the config name is repeated in the
  safetensors metadata);
* ``<path>.json``: the card — ``format`` ("vlmfast-checkpoint"), ``format_version``, ``config`` (the open_clip
  config name), ``model_cfg`` (the full config dict, so the model can be rebuilt even where the name is not
  registered), ``method``, ``data``, ``metrics``, ``vlmfast_version``, ``weights_sha256`` and whatever else the
  caller put in ``card``. The card is strict JSON: a non-finite float (NaN, inf — e.g. a metric that could not be
  computed) is written as ``null``, never as a bare ``NaN``/``Infinity`` that strict parsers reject.

Loading never unpickles arbitrary objects: ``.safetensors`` is parsed by safetensors; ``.pt``/``.pth``/``.bin``
files go through ``torch.load(..., weights_only=True)``, which refuses anything but tensors and plain containers
(:mod:`vlmfast.models.weights`; a refused pickle gets one line saying how to convert the file to safetensors).
Every failure (missing file or card, truncated or corrupt file, checksum mismatch, missing/unexpected key, wrong
shape) raises :class:`CheckpointError` naming the file and, where there is one, the key.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from vlmfast._cache import atomic_target, atomic_write_bytes
from vlmfast.models.factory import (
    CONFIG_ATTR,
    build_from_config,
    create_model,
    get_model_config,
    list_models,
    model_config,
    resolve_device,
)
from vlmfast.models.weights import (
    TORCH_SUFFIXES,
    CheckpointError,
    load_state_dict_file,
    load_weights_into,
    sha256_file,
)

FORMAT = "vlmfast-checkpoint"
FORMAT_VERSION = 1

__all__ = ["CheckpointError", "checkpoint_paths", "json_safe", "load_checkpoint", "load_state_dict_file",
           "read_card", "save_checkpoint"]


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, card file) of a checkpoint path given with or without a suffix."""
    p = Path(path)
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    if p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES:
        return p, p.with_suffix(".json")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def json_safe(obj: Any, where: str = "card") -> Any:
    """``obj`` as strict JSON values: tuples become lists and non-finite floats (NaN, +-inf) become None (strict
    parsers reject bare ``NaN``/``Infinity``). TypeError naming ``where`` and the key for anything else that is not
    JSON (tensors, arrays, objects)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: expected str keys, got {type(k).__name__} key {k!r}")
            out[k] = json_safe(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: expected JSON-serialisable values (None, bool, int, float, str, list, dict), got "
                    f"{type(obj).__name__}")


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the weights path.

    ``card``: JSON-serialisable metadata (``method``, ``data``, ``metrics``, ``seed``, ...). The config is taken
    from the model (``model.vlmfast_config``, set by :func:`vlmfast.models.create_model`) or from
    ``card["config"]`` (an open_clip config name) / ``card["model_cfg"]`` (a config dict).
    """
    from safetensors.torch import save_file

    from vlmfast._version import __version__

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if card is None:
        card = {}
    if not isinstance(card, Mapping):
        raise TypeError(f"card: expected a dict, got {type(card).__name__}")
    card = json_safe(dict(card), "card")
    cfg = model_config(model)
    name = card.get("config") or (cfg["name"] if cfg else None)
    model_cfg = card.get("model_cfg") or (cfg["model_cfg"] if cfg else None)
    if name is None and model_cfg is None:
        raise ValueError(
            "card: the model was not built by vlmfast.models.create_model, so the card must name its open_clip "
            "config ('config': name) or carry it ('model_cfg': dict)"
        )
    if model_cfg is None:
        model_cfg = get_model_config(name)
    weights_path, card_path = checkpoint_paths(path)
    if weights_path.suffix != ".safetensors":
        raise ValueError(f"path: checkpoints are written as safetensors; got {str(path)!r}")

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory: give each its own storage.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            state[k] = v.clone()
        elif ptr != -1:
            seen.add(ptr)
    with atomic_target(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "config": str(name or "")})
        digest = sha256_file(tmp)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": name,
        "model_cfg": model_cfg,
        "method": card.get("method", "unknown"),
        "data": card.get("data"),
        "metrics": card.get("metrics", {}),
        "vlmfast_version": __version__,
        "weights_file": weights_path.name,
        "weights_sha256": digest,
    }
    for k, v in card.items():
        full.setdefault(k, v)
    text = json.dumps(json_safe(full), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(card_path, (text + "\n").encode())
    return weights_path


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON card of a checkpoint (path with or without suffix). CheckpointError if missing or unreadable."""
    _, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        raise CheckpointError(f"{card_path}: card missing (a vlmfast checkpoint is <path>.safetensors + <path>.json)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{card_path}: card is not valid JSON ({e})") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path}: card must be a JSON object, got {type(card).__name__}")
    if "config" not in card and "model_cfg" not in card:
        raise CheckpointError(f"{card_path}: card has neither 'config' nor 'model_cfg'; cannot rebuild the model")
    return card


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    config: str | None = None,
    verify: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint: returns ``(model, card)``, the model in eval mode.

    ``path``: ``<path>`` / ``<path>.safetensors`` / ``<path>.json`` of a :func:`save_checkpoint` pair, or a
    ``.pt``/``.pth``/``.bin`` state dict with a card ``<stem>.json`` beside it — or, for a foreign state dict with no
    card, ``config=`` naming the open_clip config to build. ``verify`` checks the weights' SHA-256 against the card
    when the card has one.
    """
    weights_path, card_path = checkpoint_paths(path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: no such checkpoint file")
    if card_path.is_file() or config is None:
        card = read_card(path)
    else:
        card = {"config": config, "method": "unknown", "weights_file": weights_path.name}
    if config is not None and card.get("config") not in (None, config):
        raise CheckpointError(f"{card_path}: card says config {card['config']!r}, but config={config!r} was asked for")
    name = config or card.get("config")
    model_cfg = card.get("model_cfg")
    if verify and card.get("weights_sha256"):
        digest = sha256_file(weights_path)
        if digest != card["weights_sha256"]:
            raise CheckpointError(
                f"{weights_path}: SHA-256 {digest[:12]}... does not match the card's weights_sha256 "
                f"{card['weights_sha256'][:12]}... (file truncated, corrupt or replaced)"
            )
    dev = resolve_device(device)
    registered = get_model_config(name) if isinstance(name, str) and name in list_models() else None
    if model_cfg is None and registered is None:
        raise CheckpointError(f"{card_path}: config {name!r} is not registered and the card has no 'model_cfg'")
    if model_cfg is None or model_cfg == registered:
        model_cfg = registered
        model = create_model(name, pretrained=None, device="cpu")
    else:  # a config that differs from (or is absent in) the registry: build exactly what the card describes
        try:
            model = build_from_config(model_cfg)
        except Exception as e:
            raise CheckpointError(f"{card_path}: 'model_cfg' cannot build a model ({type(e).__name__}: {e})") from e
    state = load_state_dict_file(weights_path)
    load_weights_into(model, state, weights_path, config_name=name)
    model = model.to(dev).eval()
    setattr(model, CONFIG_ATTR, {"name": name, "model_cfg": model_cfg})
    return model, card
