"""The on-disk cache: built datasets, pretrained tiny bases and encoded features, keyed by a content hash of
everything that determines them. Location: ``$VLMFAST_CACHE`` if set, else ``$XDG_CACHE_HOME/vlmfast``, else
``~/.cache/vlmfast``. Writes go to a temporary file renamed into place, so a killed job never leaves a torn entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir(sub: str | None = None) -> Path:
    root = os.environ.get("VLMFAST_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "vlmfast"
    path = base / sub if sub else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable description (keys sorted; tuples as lists; floats by repr)."""
    text = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_path(path: Path):
    """A temporary sibling path to write to, then ``os.replace`` onto ``path`` (for writers that take a path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_target(path: Path):
    """``with atomic_target(path) as tmp:`` write ``tmp``; on success it replaces ``path`` in one rename, on any
    error (or a kill) ``path`` keeps its old content and the temporary file is removed."""
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
