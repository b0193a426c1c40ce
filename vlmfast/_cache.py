"""The on-disk cache: built datasets, pretrained tiny bases and encoded features, keyed by a content hash of
everything that determines them. Location: ``$VLMFAST_CACHE`` if set, else ``$XDG_CACHE_HOME/vlmfast``, else
``~/.cache/vlmfast``.

**Atomic writes** (:func:`atomic_target`, used by every cache and checkpoint writer): a file is written to a
temporary sibling ``<name>.<host>.<pid>.<random>.tmp`` and renamed into place, so a reader never sees a torn
entry. The temporary is created like any ``open(..., "w")`` file (mode ``0o666`` minus the umask: a shared
checkpoint folder stays readable by its group), and removed on any error. Killed writers leave nothing behind
for long: on ``SIGTERM`` (from ``timeout``, a scheduler, ``kill``) the live temporaries are removed before the
process dies by the signal as it would have; after ``SIGKILL`` (which no process can catch) the next write into
the same folder removes every temporary whose writer is gone (same host, pid no longer running) or that nobody
has touched for :data:`STALE_AFTER_S` seconds.

**Integrity**: :func:`content_digest` is the SHA-256 stored inside cache entries and checked when they load, so
an entry whose contents changed after it was written is rebuilt instead of used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

#: A temporary file that nobody has modified for this long belongs to no live writer (any host) and is removed.
STALE_AFTER_S = 3600.0


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


def content_digest(arrays: Mapping[str, Any], meta: Any = None) -> str:
    """SHA-256 (hex) of named arrays (numpy arrays or CPU tensors: name, dtype, shape and bytes of each, in name
    order) and of an optional JSON-serialisable ``meta``. Stored in cache entries and verified on load."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        v = arrays[name]
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        a = np.ascontiguousarray(a)
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.view(np.uint8).reshape(-1).tobytes() if a.size else b"")
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True, default=repr, separators=(",", ":")).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- temporaries


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-")[:40]
    return name or "host"


_HOST = _hostname()
_TMP_RE = re.compile(r"^.+\.(?P<host>[A-Za-z0-9-]{1,40})\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp$")
# Temporaries of earlier vlmfast versions (tempfile.mkstemp): removed by age only.
_OLD_TMP_RE = re.compile(r"^.+\.(?:npz|safetensors|json|npy)\.[a-z0-9_]{8}\.tmp$")

_live: set[str] = set()
_live_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; rely on the age rule
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError), or cannot tell
        return True
    return True


def clean_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of killed writers from ``directory`` (see the module docstring); returns them.
    Never touches a live writer's file; errors (a read-only folder, a file removed meanwhile) are ignored."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.endswith(".tmp"):
            continue
        m = _TMP_RE.match(name)
        if m is None and _OLD_TMP_RE.match(name) is None:
            continue
        stale = m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        try:
            if not stale:
                stale = entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > STALE_AFTER_S
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _new_temp(path: Path) -> Path:
    """Create an empty temporary sibling of ``path``: mode 0o666 minus the umask, as ``open()`` would."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    for _ in range(64):
        tmp = path.parent / f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file next to it")  # pragma: no cover


def _on_sigterm(signum, frame) -> None:  # pragma: no cover - runs in a process that then dies
    for p in list(_live):
        try:
            os.unlink(p)
        except OSError:
            pass
    _live.clear()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die by the signal, exactly as without this handler


def _track(tmp: Path) -> None:
    with _live_lock:
        _live.add(str(tmp))
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _on_sigterm)
            except (ValueError, OSError):  # not the main interpreter, or signals unavailable
                pass


def _untrack(tmp: Path) -> None:
    with _live_lock:
        _live.discard(str(tmp))
        if not _live and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            try:
                if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
            except (ValueError, OSError):
                pass


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_target(path) as tmp:`` write ``tmp``; on success it replaces ``path`` in one rename, on any
    error (or SIGTERM) ``path`` keeps its old content and the temporary file is removed. Stale temporaries of
    killed writers in the same folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = _new_temp(path)
    _track(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _untrack(tmp)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_target`)."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_path(path: str | os.PathLike) -> Path:
    """A new empty temporary sibling of ``path`` to write and then ``os.replace`` onto it yourself (prefer
    :func:`atomic_target`, which also removes it on errors and SIGTERM)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _new_temp(path)
