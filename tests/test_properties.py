"""Property test: random shapes, dtypes and values at the public entry points. Every outcome is a correct result
or a clear ValueError/TypeError: never a crash, a hang or a silently wrong number."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _utils import np_calibration
from vlmfast import BackendError
from vlmfast.metrics import calibration
from vlmfast.ops.calibration_bins import calibration_bins

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def cases(draw):
    M = draw(st.integers(1, 3))
    N = draw(st.integers(0, 40))
    C = draw(st.integers(0, 9))
    two_d = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES + [torch.int64]))
    scale = draw(st.sampled_from([0.0, 1.0, 5.0, 100.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, N, C)) * scale
    poison = draw(st.sampled_from([None, "nan", "inf", "-inf"]))
    if poison and x.size:
        x.flat[rng.integers(0, x.size)] = float(poison)
    labels = rng.integers(0, max(C, 1), size=N)
    bad_label = draw(st.sampled_from([None, -1, "C"]))
    if bad_label is not None and N:
        labels[rng.integers(0, N)] = -1 if bad_label == -1 else C
    n_bins = draw(st.sampled_from([-1, 0, 1, 2, 7, 15]))
    backend = draw(st.sampled_from(["cpp", "torch", "triton"]))
    logits = torch.from_numpy(x).to(dtype) if dtype != torch.int64 else torch.from_numpy(x).long()
    if two_d:
        logits = logits[0]
    return logits, torch.from_numpy(labels), n_bins, backend, poison, bad_label


def _expected_error(logits, labels, n_bins, poison, bad_label):
    if n_bins < 1:
        return ValueError
    if not logits.is_floating_point():
        return TypeError
    if logits.numel() == 0:
        return ValueError
    if bad_label is not None:
        return ValueError
    if poison is not None and not bool(torch.isfinite(logits).all()):
        return "nonfinite"  # detected by the kernel, after a backend was chosen
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_calibration_is_correct_or_raises_clearly(case):
    logits, labels, n_bins, backend, poison, bad_label = case
    expected = _expected_error(logits, labels, n_bins, poison, bad_label)
    if backend == "triton" and logits.dtype == torch.float64 and expected in (None, "nonfinite"):
        with pytest.raises(BackendError, match="float64"):  # validated input, but triton has no float64 path
            calibration(logits, labels, n_bins, backend=backend)
        return
    if expected == "nonfinite":
        with pytest.raises(ValueError, match="expected finite values"):
            calibration(logits, labels, n_bins, backend=backend)
        return
    if expected is not None:
        with pytest.raises(expected):
            calibration(logits, labels, n_bins, backend=backend)
        return
    res = calibration(logits, labels, n_bins, backend=backend)
    x = logits.double().reshape(-1, *logits.shape[-2:])
    for m in range(x.shape[0]):
        ref = np_calibration(x[m].numpy(), labels.numpy(), n_bins)
        got = {k: (getattr(res, k) if logits.dim() == 2 else getattr(res, k)[m]).item()
               for k in ("ece", "ace", "nll", "brier", "accuracy", "confidence")}
        conf = ref["conf"]
        scaled = conf * n_bins
        ambiguous = bool((np.abs(scaled - np.round(scaled)) / n_bins < 1e-5).any())
        ambiguous |= len(np.unique(np.round(conf, 5))) < len(conf)  # near-ties: equal-mass order may differ
        # always: values are finite and in range
        assert all(np.isfinite(v) for v in got.values()), got
        assert 0.0 <= got["ece"] <= 1.0 and 0.0 <= got["ace"] <= 1.0 and 0.0 <= got["brier"] <= 2.0 + 1e-6
        assert got["nll"] >= -1e-6
        # exact comparison where float32 and float64 cannot disagree about a bin
        for k in ("nll", "brier", "accuracy", "confidence"):
            assert np.isclose(got[k], ref[k], rtol=1e-4, atol=1e-4), (k, got[k], ref[k])
        if not ambiguous:
            for k in ("ece", "ace"):
                assert np.isclose(got[k], ref[k], rtol=1e-4, atol=1e-5), (k, got[k], ref[k])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([None, 3, "x", 2.5, [1, 2]]), st.sampled_from(["cpp", "torch"]))
def test_op_rejects_non_tensor_inputs(labels, backend):
    with pytest.raises((TypeError, ValueError)):
        calibration_bins("not logits", labels, backend=backend)
