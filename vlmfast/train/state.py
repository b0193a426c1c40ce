"""Resumable training checkpoints: ``<checkpoint_dir>/step-<8 digits>.pt``.

One file holds everything a run needs to continue exactly: the model's trainable parameters and all its buffers,
the optimizer state, the step, the per-step losses and logged metrics, the RNG states (torch CPU and CUDA, Python
``random``, NumPy) and each callback's ``state_dict()``, plus the run's fingerprint (the settings that determine
the trajectory). Only tensors and plain containers are stored, written with ``torch.save`` to a temporary file
renamed into place (:func:`vlmfast._cache.atomic_target`) — a file with the final name is complete — and read back
with ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vlmfast._cache import atomic_target

STATE_FORMAT = "vlmfast-train-state"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first (temporary files ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return out
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached": float(cached)}
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:  # pragma: no cover
        pass


def save_state(directory: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` (atomically), then delete all but the newest ``keep``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / checkpoint_name(step)
    with atomic_target(path) as tmp:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, **payload}, tmp)
    for _, old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """One checkpoint, read with ``torch.load(weights_only=True)``; ValueError naming the file if it is not a
    vlmfast training state."""
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a vlmfast training checkpoint (format {STATE_FORMAT!r} expected)")
    if obj.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training checkpoint version {obj.get('version')!r}, this vlmfast reads "
                         f"{STATE_VERSION}")
    return obj


def newest_state(directory: str | Path, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in ``directory`` (an unreadable one is skipped with a warning), or None."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_state(path, map_location)
        except ValueError as e:
            warnings.warn(f"skipping an unreadable training checkpoint: {e}", RuntimeWarning, stacklevel=3)
    return None
