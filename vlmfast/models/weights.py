"""Reading state dicts safely: ``.safetensors`` through safetensors, ``.pt``/``.pth``/``.bin``/``.ckpt`` through
``torch.load(weights_only=True)`` (never an unpickle of arbitrary objects), and copying them into a model after a
key-by-key check. The bottom layer of :mod:`vlmfast.models`: both :mod:`~vlmfast.models.factory` (``create_model``
with a weights file) and :mod:`~vlmfast.models.checkpoint` build on it, and it imports neither.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, or not matching the model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _refused_pickle_message(p: Path, e: BaseException) -> str:
    """One line: what was refused, that vlmfast never unpickles, and how a user who trusts the file converts it."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    what = f"it pickles the Python object {found.group(1)}" if found else "it holds pickled Python objects"
    out = p.with_suffix(".safetensors")
    return (f"{p}: torch.load(weights_only=True) refused the file: {what}, and vlmfast never unpickles; if you "
            f"trust it, convert it once to safetensors: python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(dict(torch.load('{p}', weights_only=False)), '{out}')\"")


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
    elif p.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:  # an arbitrary pickle: refused without running it
            raise CheckpointError(_refused_pickle_message(p, e)) from None
        except Exception as e:  # RuntimeError / EOFError for truncation
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{p}: torch.load(weights_only=True) could not read the file (truncated or corrupt?): "
                f"{type(e).__name__}: {first}"
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
            f"{p}: unknown checkpoint suffix {p.suffix!r}; expected .safetensors or one of {TORCH_SUFFIXES}"
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
