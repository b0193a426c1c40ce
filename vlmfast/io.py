"""Safe tensor files: ``.safetensors``, ``.pt``/``.pth`` (``torch.load(weights_only=True)``: never unpickles
arbitrary objects), ``.npy`` and ``.npz`` (``allow_pickle=False``). Errors name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".npz")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a file into a dict (a bare tensor or array comes back under the key ``"tensor"``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(p)))
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            raise ValueError(f"{p}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ValueError(f"{p}: could not be read as {suffix} ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    raise ValueError(f"{p}: expected a tensor or a dict of str -> tensor, got {type(obj).__name__}")


def load_tensor(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """One tensor from a file: ``key`` if given, else the file's only tensor."""
    d = load_tensors(path)
    if key is not None:
        if key not in d:
            raise KeyError(f"{path}: no tensor {key!r}; the file holds {sorted(d)}")
        return d[key]
    if len(d) != 1:
        raise ValueError(f"{path}: holds {len(d)} tensors {sorted(d)}; say which one with a key")
    return next(iter(d.values()))
