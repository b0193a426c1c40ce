"""Safe tensor files: ``.safetensors``, ``.pt``/``.pth`` (``torch.load(weights_only=True)``: never unpickles
arbitrary objects), ``.npy`` and ``.npz`` (``allow_pickle=False``).

Every failure is one line that names the file: a missing, truncated or corrupt file, an unsupported suffix, an
object (pickled) array, a ``.pt`` file that needs unpickling (with the one-time conversion to safetensors), a meta
tensor (shape without data), or contents that are not a tensor or a dict of str -> tensor.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".npz")


def unpickle_refusal(path: str | os.PathLike, what: str | None = None) -> str:
    """The one-line message for a torch file that needs unpickling: vlmfast never unpickles, and how to convert
    the file (once, in a session that trusts it) to safetensors."""
    p = Path(path)
    holds = f" (it holds {what})" if what else ""
    return (
        f"{p}: refused: loading it needs unpickling{holds}, and vlmfast never unpickles; if you trust the file, "
        f"convert it once: python -c \"import torch, safetensors.torch as st; "
        f"st.save_file(torch.load('{p}', weights_only=False), '{p.with_suffix('.safetensors')}')\""
    )


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _torch_load(p: Path):
    import pickle

    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"Unsupported global: GLOBAL ([\w.<>]+)", text)
        if m:
            raise ValueError(unpickle_refusal(p, f"a pickled {m.group(1)}")) from None
        m = re.search(r"WeightsUnpickler error:\s*(.+)", text, flags=re.S)
        reason = _first_line(m.group(1)) if m else _first_line(text)
        raise ValueError(f"{p}: not a readable torch file (truncated or corrupt?): {reason}") from None


def _npy_error(p: Path, exc: Exception) -> ValueError:
    text = _first_line(str(exc))
    if "Object arrays" in text or "allow_pickle" in text:
        return ValueError(
            f"{p}: holds an object array (pickled Python objects), and vlmfast never unpickles; save plain "
            "numeric arrays instead"
        )
    return ValueError(f"{p}: not a readable {p.suffix} file (truncated or corrupt?): {type(exc).__name__}: {text}")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a file into a dict (a bare tensor or array comes back under the key ``"tensor"``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{p}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = dict(load_file(str(p)))
        elif suffix in (".pt", ".pth"):
            obj = _torch_load(p)
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            with np.load(p, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
    except ValueError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise _npy_error(p, exc) from None
    except MemoryError:
        raise
    except Exception as exc:
        if suffix in (".npy", ".npz"):
            raise _npy_error(p, exc) from None
        raise ValueError(
            f"{p}: could not be read as {suffix} (truncated or corrupt?): {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if isinstance(obj, torch.Tensor):
        obj = {"tensor": obj}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{p}: expected a tensor or a dict of str -> tensor, got {_describe(obj)}")
    for k, v in obj.items():
        if v.is_meta:
            raise ValueError(f"{p}: tensor {k!r} is a meta tensor (a shape {tuple(v.shape)} without data)")
    return dict(obj)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        bad = next(((k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
        if bad is not None:
            return f"a dict whose entry {bad[0]!r:.60} is a {type(bad[1]).__name__}"
    return type(obj).__name__


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
