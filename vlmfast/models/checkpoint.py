"""Safe checkpoints: safetensors weights + a JSON card, and checked loading of foreign state dicts.

A checkpoint ``<path>`` is two files written atomically (temporary file + rename; the card last, so a card on disk
means its weights are complete):

* ``<path>.safetensors``: the model's ``state_dict`` (float tensors as stored; the config name is repeated in the
  safetensors metadata);
* ``<path>.json``: the card — ``format`` ("vlmfast-checkpoint"), ``format_version``, ``config`` (the open_clip
  config name), ``model_cfg`` (the full config dict, so the model can be rebuilt even where the name is not
  registered), ``method``, ``data``, ``metrics``, ``vlmfast_version``, ``weights_sha256`` and whatever else the
  caller put in ``card``.

Loading never unpickles arbitrary objects: ``.safetensors`` is parsed by safetensors; ``.pt``/``.pth``/``.bin``
files go through ``torch.load(..., weights_only=True)``, which refuses anything but tensors and plain containers.
Every failure (missing file or card, truncated or corrupt file, checksum mismatch, missing/unexpected key, wrong
shape) raises :class:`CheckpointError` naming the file and, where there is one, the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from vlmfast._cache import atomic_target, atomic_write_bytes

FORMAT = "vlmfast-checkpoint"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, or not matching the model."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, card file) for a checkpoint path given with or without a suffix."""
    p = Path(path)
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    if p.suffix == ".safetensors" or p.suffix in _TORCH_SUFFIXES:
        return p, p.with_suffix(".json")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(obj: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: expected JSON-serialisable values ({e})") from e


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the weights path.

    ``card``: JSON-serialisable metadata (``method``, ``data``, ``metrics``, ``seed``, ...). The config is taken
    from the model (``model.vlmfast_config``, set by :func:`vlmfast.models.create_model`) or from
    ``card["config"]`` (an open_clip config name) / ``card["model_cfg"]`` (a config dict).
    """
    from safetensors.torch import save_file

    from vlmfast._version import __version__
    from vlmfast.models.factory import get_model_config, model_config

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if card is None:
        card = {}
    if not isinstance(card, Mapping):
        raise TypeError(f"card: expected a dict, got {type(card).__name__}")
    card = dict(_json_safe(dict(card), "card"))
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
    weights_path, card_path = _paths(path)
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
        digest = _sha256(tmp)
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
    atomic_write_bytes(card_path, (json.dumps(full, indent=2, sort_keys=True) + "\n").encode())
    return weights_path


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON card of a checkpoint (path with or without suffix). CheckpointError if missing or unreadable."""
    _, card_path = _paths(path)
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


def load_state_dict_file(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file (``torch.load(weights_only=True)``;
    a ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are undone). CheckpointError on any failure."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        try:
            state = load_file(str(p), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    elif p.suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location=device, weights_only=True)
        except Exception as e:  # UnpicklingError for arbitrary pickles, RuntimeError/EOFError for truncation
            kind = type(e).__name__
            raise CheckpointError(
                f"{p}: torch.load(weights_only=True) refused or failed to read the file ({kind}: {e}). Only plain "
                "state dicts of tensors are accepted; arbitrary pickled objects are never loaded"
            ) from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{p}: expected a state dict (dict of tensors), got {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise CheckpointError(
                    f"{p}: expected a state dict of str -> Tensor, entry {k!r} is {type(v).__name__}"
                )
        state = obj
    else:
        raise CheckpointError(
            f"{p}: unknown checkpoint suffix {p.suffix!r}; expected .safetensors or one of {_TORCH_SUFFIXES}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_into(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    config_name: str | None = None,
) -> None:
    """Copy ``state`` into ``model`` after checking every key and shape; CheckpointError naming ``path`` and the
    first offending keys otherwise (nothing is copied then)."""
    p = Path(path)
    expected = model.state_dict()
    what = f"the model {config_name!r}" if config_name else "the model"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
            )
        raise CheckpointError(f"{p}: does not match {what}: " + "; ".join(parts))
    for k, v in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{p}: key {k!r} has shape {tuple(got.shape)} but {what} expects {tuple(v.shape)}"
            )
        if got.is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{p}: key {k!r} has dtype {got.dtype} but {what} expects {v.dtype}")
    model.load_state_dict(dict(state), strict=True)


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
    from vlmfast.models.factory import CONFIG_ATTR, _open_clip, _quiet_random_init, _resolve_device, build_from_config

    weights_path, card_path = _paths(path)
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
        digest = _sha256(weights_path)
        if digest != card["weights_sha256"]:
            raise CheckpointError(
                f"{weights_path}: SHA-256 {digest[:12]}... does not match the card's weights_sha256 "
                f"{card['weights_sha256'][:12]}... (file truncated, corrupt or replaced)"
            )
    oc = _open_clip()
    dev = _resolve_device(device)
    registered = oc.get_model_config(name) if name else None
    if model_cfg is None and registered is None:
        raise CheckpointError(f"{card_path}: config {name!r} is not registered and the card has no 'model_cfg'")
    if model_cfg is None or model_cfg == registered:
        model_cfg = registered
        with _quiet_random_init(True):
            model = oc.create_model(name, pretrained=None, device="cpu")
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
