"""Property test of the command line: random files (format, keys, shapes, dtypes, values, corrupt bytes) and
random options. Every outcome is either the correct result (the JSON equals the library's numbers) or a one-line
error with exit status 2 — never a traceback, a hang, or a result where an error was due."""

import contextlib
import io
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vlmfast import BackendError
from vlmfast.cli import main
from vlmfast.metrics import calibration

KEYS = ["logits", "labels", "x", "y"]
FORMATS = ["npz", "safetensors", "pt", "npy", "garbage", "txt"]


def _numpy_safe(fmt, tensors):
    """numpy has no bfloat16: the numpy formats store such a tensor as float32."""
    if fmt not in ("npz", "npy"):
        return tensors
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in tensors.items()}


def _save(path, fmt, tensors):
    tensors = _numpy_safe(fmt, tensors)
    if fmt == "npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    elif fmt == "pt":
        torch.save(tensors, path)
    elif fmt == "npy":  # one bare array
        np.save(path, next(iter(tensors.values())).numpy())
    elif fmt == "garbage":  # a known suffix with bytes that are no such file
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY-not-really" + os.urandom(16))
    else:
        with open(path, "w") as f:
            f.write("1,2,3\n")


def _suffix(fmt):
    return {"garbage": "npz", "txt": "txt"}.get(fmt, fmt)


def _stored(fmt, tensors):
    """What a reader should find in the file: the dict, or {"tensor": x} for .npy; None for unreadable files."""
    if fmt in ("garbage", "txt"):
        return None
    tensors = _numpy_safe(fmt, tensors)
    if fmt == "npy":
        return {"tensor": next(iter(tensors.values()))}
    return tensors


def _mostly(good, *bad, weight=6):
    """A strategy that draws ``good`` (a value or a list of them) most of the time and each of ``bad`` rarely."""
    good = good if isinstance(good, list) else [good]
    return st.sampled_from(good * weight + list(bad))


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    M, N, C = draw(st.integers(1, 3)), draw(_mostly(list(range(1, 26)), 0)), draw(_mostly([2, 3, 5], 0, 1))
    x = rng.normal(size=(M, N, C)) * draw(st.sampled_from([1.0, 30.0]))
    poison = draw(_mostly(None, "nan", "inf", weight=10))
    if poison and x.size:
        x.flat[rng.integers(0, x.size)] = float(poison)
    ldtype = draw(_mostly([torch.float32, torch.float64], torch.float16, torch.bfloat16, torch.int64, weight=3))
    logits = torch.from_numpy(x).to(ldtype)
    if draw(st.booleans()):
        logits = logits[0]
    n_lab = draw(_mostly(N, N + 1, weight=12))
    y = rng.integers(0, max(C, 1), size=n_lab)
    if n_lab and draw(_mostly(False, True, weight=10)):
        y[rng.integers(0, n_lab)] = draw(st.sampled_from([-1, C]))
    labels = torch.from_numpy(y).to(draw(_mostly([torch.int64, torch.int32], torch.float32, torch.uint8)))
    if draw(st.booleans()) and logits.dim() == 3:
        labels = labels.expand(M, -1).clone()

    separate = draw(st.booleans())
    fmt = draw(_mostly(["npz", "safetensors", "pt"], "npy", "garbage", "txt", weight=8))
    lkey = draw(_mostly("logits", *KEYS[1:], weight=12))
    ykey = draw(_mostly("labels", *KEYS, weight=12))
    if separate:
        main_file = {lkey: logits}
        if draw(_mostly(False, True, weight=4)):
            main_file["extra"] = torch.zeros(2)
        lab_fmt = draw(st.sampled_from(FORMATS[:4]))
        lab_file = {ykey: labels}
    else:
        main_file = {lkey: logits, ykey: labels} if lkey != ykey else {lkey: logits}
        lab_fmt, lab_file = None, None
    opts = {
        "logits_key": draw(_mostly([None, lkey], "nope", weight=8)),
        "labels_key": draw(_mostly([None, ykey], "nope", weight=8)),
        "n_bins": draw(_mostly([None, "1", "7", "30"], "0", "-3", "2000", "x", weight=6)),
        "binning": draw(_mostly([None, "width", "mass"], "bogus", weight=8)),
        "convention": draw(st.sampled_from([None, "standard", "dac"])),
        "per_batch": draw(_mostly([None, "4"], "0", weight=8)),
        "names": draw(_mostly([None, "right"], "a", "", weight=8)),
        "backend": draw(_mostly([None, "torch", "cpp"], "triton", "triton", "cuda", "bogus", weight=6)),
        "json": draw(st.booleans()),
    }
    return fmt, main_file, lab_fmt, lab_file, opts


def _pick(tensors, key, default):
    """The tensor the options name, by the documented rules (None: the CLI must refuse)."""
    if tensors is None:
        return None
    if key is not None:
        return tensors.get(key)
    if default in tensors:
        return tensors[default]
    return next(iter(tensors.values())) if len(tensors) == 1 else None


def _expected(fmt, main_file, lab_fmt, lab_file, opts):
    """The library's result for what the CLI should load, or "error" where a one-line error is due."""
    if opts["n_bins"] == "x" or opts["binning"] == "bogus":
        return "error"
    stored = _stored(fmt, main_file)
    if lab_file is None:
        if stored is None:
            return "error"
        lk, yk = opts["logits_key"] or "logits", opts["labels_key"] or "labels"
        if lk == yk or lk not in stored or yk not in stored:
            return "error"
        logits, labels = stored[lk], stored[yk]
    else:
        logits = _pick(stored, opts["logits_key"], "logits")
        labels = _pick(_stored(lab_fmt, lab_file), opts["labels_key"], "labels")
        if logits is None or labels is None:
            return "error"
    kw = dict(binning=opts["binning"] or "width", convention=opts["convention"] or "standard",
              per_batch=int(opts["per_batch"]) if opts["per_batch"] else None, backend=opts["backend"])
    try:
        res = calibration(logits, labels, int(opts["n_bins"] or 15), **kw)
    except (ValueError, TypeError, BackendError):
        return "error"
    if opts["names"] in ("a", "") and res.n_models != 1 or opts["names"] == "":
        return "error"
    return res


def _argv(tmp, fmt, main_file, lab_fmt, lab_file, opts):
    path = os.path.join(tmp, f"run.{_suffix(fmt)}")
    _save(path, fmt, main_file)
    argv = ["calibration", path]
    if lab_file is not None:
        lab = os.path.join(tmp, f"lab.{_suffix(lab_fmt)}")
        _save(lab, lab_fmt, lab_file)
        argv += ["--labels", lab]
    for opt in ("logits_key", "labels_key", "n_bins", "binning", "convention", "per_batch", "backend"):
        if opts[opt] is not None:
            argv += ["--" + opt.replace("_", "-"), opts[opt]]
    return argv


def _close(a, b):
    if a is None or b is None:
        return a is None and (b is None or not math.isfinite(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cli_gives_the_result_or_one_line_exit_2(case):
    fmt, main_file, lab_fmt, lab_file, opts = case
    want = _expected(*case)
    with tempfile.TemporaryDirectory() as tmp:
        argv = _argv(tmp, *case)
        if opts["names"] is not None:
            n = 1 if isinstance(want, str) else want.n_models
            argv += ["--names", ",".join(f"m{i}" for i in range(n)) if opts["names"] == "right" else opts["names"]]
        js = os.path.join(tmp, "out", "m.json")
        if opts["json"]:
            argv += ["--json", js]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)  # an uncaught exception fails the test with its traceback
        err = err.getvalue()
        event("error" if isinstance(want, str) else "result")
        if isinstance(want, str):
            assert rc == 2, (argv, out.getvalue())
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vlmfast calibration: error: "), (argv, err)
            return
        assert rc == 0 and err == "", (argv, err)
        table = out.getvalue().strip().splitlines()
        assert len(table) == 2 + want.n_models
        if opts["json"]:
            got = json.loads(open(js).read(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
            ece = want.ece.reshape(-1).tolist()
            assert all(_close(g, w) for g, w in zip(np.ravel(got["ece"]).tolist(), ece)), (argv, got["ece"], ece)
            assert np.ravel(got["bin_count"]).tolist() == want.bin_count.reshape(-1).tolist()
