"""Helpers shared by the commands: strict JSON output and output paths."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON ``null``), recursively; tuples become lists,
    other non-JSON values their ``str``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors, arrays, numpy scalars
        return strict(obj.tolist())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (no bare NaN/Infinity: they become ``null``) to ``path``, creating its parent
    folders (as the plots do); the file is replaced in one rename, never left half-written."""
    out = Path(path)
    text = json.dumps(strict(obj), indent=1, allow_nan=False) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # opened normally: the umask's permissions, not 0600
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def output_path(value: str | None, option: str) -> Path | None:
    """An output file option: None when not given; a ValueError naming ``option`` for an empty value or an
    existing folder."""
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"{option}: expected a file path, got {value!r}")
    p = Path(value)
    if p.is_dir():
        raise ValueError(f"{option}: expected a file path, got the folder {value!r}")
    return p
