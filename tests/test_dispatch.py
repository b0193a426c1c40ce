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
    # The interpreter is a test vehicle: it never outranks cpp on CPU tensors, and runs them only when forced.
    assert _select(x) == "cpp"
    assert _select(x, "triton") == "triton"
    reasons = _dispatch.explain(OP, logits=x, n_bins=15)
    assert any("only when forced" in r for r in reasons["triton"])
    assert _dispatch.explain(OP, "triton", logits=x, n_bins=15)["triton"] == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _select(x) == "cpp"
    assert _select(x.double()) == "cpp"
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        _select(x, "triton")


def test_interpreter_is_last_resort_only_when_forced(monkeypatch):
    """Even without the compiled module, an unforced CPU call gets the torch reference, not the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(_dispatch._BACKENDS, "cpp", _dispatch.Backend(
        "cpp", "disabled for the test", ("cpu",), 30, lambda: ["simulated: no vlmfast._C"]))
    assert _select(torch.zeros(1, 2, 3)) == "torch"


def test_input_reasons_route_around_a_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reasons = _dispatch.explain(OP, "triton", logits=torch.zeros(1, 2, 3, dtype=torch.float64), n_bins=15)
    assert set(reasons) == {"triton", "cuda", "cpp", "torch"}
    assert any("float64" in r for r in reasons["triton"])
    assert reasons["cpp"] == [] and reasons["torch"] == []
    assert _select(torch.zeros(1, 2, 3, dtype=torch.float64)) == "cpp"


def test_a_backend_plugs_in_without_editing_the_dispatcher():
    """A new backend object (as FAISS will be for k-means) and an op registered for it: chosen by priority,
    explained, forced, and removed again."""
    calls = []
    _dispatch.register_backend(_dispatch.Backend(
        "numpyish", "test backend", ("cpu",), 25, lambda: [], None))
    try:
        _dispatch.define_op("test_plugin_op", device_arg="x")

        @_dispatch.register("test_plugin_op", "numpyish", lambda x, **_: [] if x.dim() == 1 else ["needs 1-D"])
        def _fwd_numpyish(x):
            calls.append("numpyish")
            return x + 1

        @_dispatch.register("test_plugin_op", "torch")
        def _fwd_torch(x):
            calls.append("torch")
            return x + 1

        assert _dispatch.list_backends().index("numpyish") == _dispatch.list_backends().index("cpp") - 1
        assert _dispatch.choose("test_plugin_op", x=torch.zeros(3)) == "numpyish"
        assert _dispatch.choose("test_plugin_op", x=torch.zeros(3, 1)) == "torch"  # its check routes around it
        reasons = _dispatch.explain("test_plugin_op", x=torch.zeros(3, 1))
        assert reasons["numpyish"] == ["needs 1-D"] and reasons["cpp"] == ["no cpp implementation of test_plugin_op"]
        with pytest.raises(BackendError, match="numpyish: needs 1-D"):
            _dispatch.select("test_plugin_op", "numpyish", x=torch.zeros(3, 1))
        impl, note = _dispatch.select_step("test_plugin_op", "cpp", x=torch.zeros(3))
        assert impl.backend == "numpyish" and "forced backend 'cpp' not used" in note
        with pytest.raises(ValueError, match="already registered"):
            _dispatch.register_backend(_dispatch.Backend("numpyish", "again", ("cpu",), 1))
    finally:
        _dispatch.unregister_backend("numpyish")
        _dispatch._OPS.pop("test_plugin_op", None)
    assert "numpyish" not in _dispatch.list_backends()
    with pytest.raises(ValueError, match="backend: expected one of"):
        _dispatch.forced_backend("numpyish")


def test_differentiable_ops_must_register_a_backward():
    _dispatch.define_op("test_diff_op", device_arg="x", differentiable=True)
    try:
        with pytest.raises(ValueError, match="pass backward="):
            _dispatch.register("test_diff_op", "torch")(lambda x: x)
        _dispatch.register("test_diff_op", "torch", backward=lambda g, x: g)(lambda x: x)
        assert _dispatch.implementations("test_diff_op")["torch"].backward is not None
    finally:
        _dispatch._OPS.pop("test_diff_op", None)


def test_every_op_is_loaded_and_probed():
    ops = _dispatch.load_ops()
    assert {"calibration_bins", "equal_mass_bins"} <= set(ops)
    for op in ops:
        inputs = _dispatch.probe_inputs(op, "cpu")
        assert _dispatch.choose(op, **inputs) == "cpp"
        assert hasattr(torch.ops.vlmfast, op)


def test_forcing_by_argument_and_environment(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert _select(x, "torch") == "torch"
    assert _select(x, "auto") == "cpp"
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
    assert all(f"  {b}:" in msg for b in _dispatch.list_backends())
    assert "  torch: can run" in msg


def test_register_validates_backend_and_op_names():
    with pytest.raises(ValueError, match="backend"):
        _dispatch.register("x", "opencl", lambda **_: [])
    with pytest.raises(ValueError, match="is not defined"):
        _dispatch.register("x", "torch", lambda **_: [])
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
