"""The dispatcher: default order, forcing by argument and environment, explanations, missing binaries."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlmfast import BackendError, _dispatch
import vlmfast.ops.calibration_bins as cb  # registers the op

OP = cb.OP


def _select(logits, backend=None):
    return _dispatch.select(OP, backend, logits=logits, n_bins=15).backend


def test_default_order_on_cpu(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _select(x) == "triton"  # the interpreter accepts CPU tensors: how CI tests the kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _select(x) == "cpp"
    assert _select(x.double()) == "cpp"


def test_input_reasons_route_around_a_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = _dispatch.explain(OP, logits=torch.zeros(1, 2, 3, dtype=torch.float64), n_bins=15)
    assert set(reasons) == {"triton", "cuda", "cpp", "torch"}
    assert any("float64" in r for r in reasons["triton"])
    assert reasons["cpp"] == [] and reasons["torch"] == []
    assert _select(torch.zeros(1, 2, 3, dtype=torch.float64)) == "cpp"


def test_forcing_by_argument_and_environment(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert _select(x, "torch") == "torch"
    assert _select(x, "auto") in ("triton", "cpp")
    monkeypatch.setenv("VLMFAST_BACKEND", "torch")
    assert _select(x) == "torch"
    assert _select(x, "cpp") == "cpp"  # the argument wins over the environment
    monkeypatch.setenv("VLMFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VLMFAST_BACKEND"):
        _select(x)
    with pytest.raises(ValueError, match="backend: expected one of"):
        _select(x, "gpu")


def test_forced_backend_never_falls_back(monkeypatch):
    monkeypatch.setenv("VLMFAST_BACKEND", "cuda")
    with pytest.raises(BackendError) as ei:
        cb.calibration_bins(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    msg = str(ei.value)
    assert "forced backend 'cuda'" in msg
    assert all(f"  {b}:" in msg for b in _dispatch.BACKENDS)
    assert "  torch: can run" in msg


def test_register_validates_backend_and_op_names():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.register("x", "opencl", lambda **_: [])
    with pytest.raises(ValueError, match="op: expected one of"):
        _dispatch.explain("no_such_op")
    assert OP in _dispatch.list_ops()


def test_missing_binary_never_breaks_import(tmp_path):
    """A broken vlmfast._C: import vlmfast works, the cpp/cuda backends explain why, the torch path still runs."""
    code = textwrap.dedent(
        """
        import sys, logging, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vlmfast._C":
                    raise ImportError("simulated: undefined symbol in _C.so")
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        import torch, vlmfast
        from vlmfast import _dispatch
        from vlmfast.ops.calibration_bins import calibration_bins
        r = calibration_bins(torch.randn(3, 5, 4), torch.zeros(5, dtype=torch.long))
        print("BACKEND", r.backend)
        print("CPP", _dispatch.backend_reasons("cpp"))
        print("CUDA", _dispatch.backend_reasons("cuda"))
        from vlmfast.info import format_info, info_dict
        print(format_info(info_dict()))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("VLMFAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BACKEND torch" in out.stdout
    assert "simulated: undefined symbol" in out.stdout.split("CPP", 1)[1]
    assert "NOT LOADED" in out.stdout
    assert out.stderr.count("LOG vlmfast._C could not be imported") == 1  # logged once
