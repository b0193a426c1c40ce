"""vlmfast.io (safe tensor files: one-line errors naming the file) and vlmfast._cache (atomic writes: umask-respecting
modes, no temporaries left by SIGTERM or SIGKILL, stale-temporary cleanup, content digests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmfast import _cache
from vlmfast.io import load_tensor, load_tensors

ROOT = Path(__file__).resolve().parents[1]


def _one_line(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    return msg


# ---------------------------------------------------------------------- io


def test_roundtrip_every_format(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2, 3])
    save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"))
    torch.save({"a": a, "b": b}, tmp_path / "x.pt")
    torch.save(a, tmp_path / "bare.pth")
    np.save(tmp_path / "x.npy", a.numpy())
    np.savez(tmp_path / "x.npz", a=a.numpy(), b=b.numpy())
    for name in ("x.safetensors", "x.pt", "x.npz"):
        d = load_tensors(tmp_path / name)
        assert sorted(d) == ["a", "b"] and torch.equal(d["a"], a) and torch.equal(d["b"], b), name
    assert torch.equal(load_tensor(tmp_path / "bare.pth"), a)
    assert torch.equal(load_tensor(tmp_path / "x.npy"), a)
    assert torch.equal(load_tensor(tmp_path / "x.npz", "b"), b)
    with pytest.raises(KeyError, match="no tensor 'c'"):
        load_tensor(tmp_path / "x.npz", "c")
    with pytest.raises(ValueError, match="holds 2 tensors"):
        load_tensor(tmp_path / "x.npz")


def test_truncated_and_object_arrays_name_the_file(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(100.0))
    raw = (tmp_path / "t.npy").read_bytes()
    for cut, name in ((len(raw) // 2, "half.npy"), (60, "header.npy"), (0, "empty.npy")):
        (tmp_path / name).write_bytes(raw[:cut])
        with pytest.raises(ValueError) as ei:
            load_tensors(tmp_path / name)
        assert "truncated or corrupt" in _one_line(ei, tmp_path / name)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", ok=np.zeros(2), bad=np.array([None, 1], dtype=object))
    for name in ("obj.npy", "obj.npz"):
        with pytest.raises(ValueError) as ei:
            load_tensors(tmp_path / name)
        assert "object array" in _one_line(ei, tmp_path / name) and "never unpickles" in str(ei.value)
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError) as ei:
        load_tensors(tmp_path / "z.npz")
    _one_line(ei, tmp_path / "z.npz")


def test_pickled_pt_is_refused_in_one_line(tmp_path):
    script = textwrap.dedent(f"""
        import collections, torch
        class Thing:
            pass
        torch.save({{"w": torch.ones(2), "extra": Thing()}}, {str(tmp_path / "pickled.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    p = tmp_path / "pickled.pt"
    with pytest.raises(ValueError) as ei:
        load_tensors(p)
    msg = _one_line(ei, p)
    assert "vlmfast never unpickles" in msg and "__main__.Thing" in msg
    assert "safetensors" in msg and str(p.with_suffix(".safetensors")) in msg
    assert msg.count("weights_only") == 1  # the conversion command, not torch's advice repeated
    (tmp_path / "junk.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError) as ei:
        load_tensors(tmp_path / "junk.pt")
    _one_line(ei, tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(ValueError) as ei:
        load_tensors(tmp_path / "junk.safetensors")
    _one_line(ei, tmp_path / "junk.safetensors")


def test_contents_that_are_not_tensors(tmp_path):
    torch.save({"m": torch.empty(3, 4, device="meta")}, tmp_path / "meta.pt")
    with pytest.raises(ValueError) as ei:
        load_tensors(tmp_path / "meta.pt")
    assert "'m' is a meta tensor" in _one_line(ei, tmp_path / "meta.pt")
    torch.save({"a": torch.ones(1), "n": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError) as ei:
        load_tensors(tmp_path / "mixed.pt")
    assert "entry 'n' is a int" in _one_line(ei, tmp_path / "mixed.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got list"):
        load_tensors(tmp_path / "list.pt")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        load_tensors(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tensors(tmp_path / "absent.pt")


# ---------------------------------------------------------------------- atomic writes


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_written_files_respect_the_umask(tmp_path, umask, monkeypatch):
    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        p = tmp_path / f"card-{mask:o}.json"
        _cache.atomic_write_bytes(p, b"{}")
        assert p.stat().st_mode & 0o777 == mode, (oct(mask), oct(p.stat().st_mode))
    umask(0o002)
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path / "cache"))
    import vlmfast.data as D

    D.spurious_mnist("test", n=20)  # a dataset cache entry
    (entry,) = (tmp_path / "cache" / "data").glob("spurious_mnist-test-*.npz")
    assert entry.stat().st_mode & 0o777 == 0o664


def test_atomic_target_cleans_up_on_error(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), _cache.atomic_target(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["a.bin"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporaries_are_removed(tmp_path):
    host = _cache._HOST
    dead = tmp_path / f"x.npz.{host}.{_dead_pid()}.0123abcd.tmp"
    live = tmp_path / f"y.npz.{host}.{os.getpid()}.0123abcd.tmp"
    other_host = tmp_path / f"z.npz.elsewhere-{host}.{_dead_pid()}.0123abcd.tmp"
    old_style = tmp_path / "w.npz.k2j4_x9q.tmp"  # tempfile.mkstemp name of an earlier version
    old_style_stale = tmp_path / "v.safetensors.ab_cd_ef.tmp"
    stale_other_host = tmp_path / f"u.npz.elsewhere-{host}.7.89abcdef.tmp"
    unrelated = tmp_path / "notes.tmp"
    for f in (dead, live, other_host, old_style, old_style_stale, stale_other_host, unrelated):
        f.write_bytes(b"x" * 10)
    hours_ago = time.time() - 2 * _cache.STALE_AFTER_S
    for f in (old_style_stale, stale_other_host, unrelated):
        os.utime(f, (hours_ago, hours_ago))
    removed = _cache.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (dead, old_style_stale, stale_other_host))
    assert live.exists() and other_host.exists() and old_style.exists() and unrelated.exists()


_WRITER = """
import sys, time
from pathlib import Path
from vlmfast._cache import atomic_target
with atomic_target(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print("ready", flush=True)
    time.sleep(60)
"""


def _start_writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(target.parent.glob("*.tmp"))) == 1
    return proc


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_removes_the_temporary(tmp_path):
    target = tmp_path / "entry.npz"
    proc = _start_writer(target)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # still dies by the signal, as without the handler
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigkill_leftover_is_removed_by_the_next_build(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    proc = _start_writer(data / "spurious_mnist-test-killed.npz")
    proc.kill()
    proc.wait(timeout=30)
    assert len(list(data.glob("*.tmp"))) == 1  # SIGKILL cannot be caught
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    import vlmfast.data as D

    D.spurious_mnist("test", n=20)
    assert list(data.glob("*.tmp")) == [] and len(list(data.glob("spurious_mnist-test-*.npz"))) == 1


def test_content_digest():
    a = {"x": np.arange(4, dtype=np.int64), "y": np.zeros((2, 2), dtype=np.float32)}
    d = _cache.content_digest(a, {"k": 1})
    assert d == _cache.content_digest({"y": torch.zeros(2, 2), "x": torch.arange(4)}, {"k": 1})
    assert d != _cache.content_digest(a, {"k": 2})
    assert d != _cache.content_digest({**a, "x": np.arange(4, dtype=np.int32)}, {"k": 1})
    assert d != _cache.content_digest({**a, "y": np.zeros((4,), dtype=np.float32)}, {"k": 1})
    b = {k: v.copy() for k, v in a.items()}
    b["x"][3] = 5
    assert d != _cache.content_digest(b, {"k": 1})
