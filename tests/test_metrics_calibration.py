"""vlmfast.metrics.calibration / CalibrationError against an independent numpy implementation, torchmetrics,
netcal, the DAC/DOR reference semantics and a case computed by hand."""

import math

import numpy as np
import pytest
import torch

from _tolerances import tol
from _utils import (
    assert_close,
    dac_ace,
    dac_ece,
    dac_mce,
    far_from_edges,
    make_case,
    np_calibration,
    np_row_stats,
)
from vlmfast.metrics import CalibrationError, CalibrationResult, calibration

SCALARS = ["ece", "ace", "mce", "mce_weighted", "rmsce", "nll", "brier", "accuracy", "confidence"]
METRIC_TOL = tol("calibration_bins", torch.float64, "metric")
F32_TOL = tol("calibration_bins", torch.float32, "metric")


def _check_against_numpy(res, logits, labels, n_bins, per_batch=None, t=METRIC_TOL):
    for m in range(logits.shape[0]):
        ref = np_calibration(logits[m].double().numpy(), labels.numpy(), n_bins, per_batch)
        for k in SCALARS + (["ece_per_batch"] if per_batch else []):
            assert_close(getattr(res, k)[m], ref[k], name=f"model {m} {k}", **t)
        np.testing.assert_array_equal(res.bin_count[m].numpy(), ref["bin_count"])
        assert_close(res.bin_accuracy[m], ref["bin_accuracy"], name="bin_accuracy", **t)
        assert_close(res.bin_confidence[m], ref["bin_confidence"], name="bin_confidence", **t)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_all_metrics_match_numpy_float64(backend, n_bins):
    logits, labels = make_case(4, 1023, 9, n_bins_list=(n_bins,), saturated=7, tied=4, seed=n_bins)
    res = calibration(logits, labels, n_bins, per_batch=100, backend=backend)
    assert res.ece.shape == (4,) and res.bin_count.shape == (4, n_bins)
    _check_against_numpy(res, logits, labels, n_bins, per_batch=100)


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_numpy_on_the_same_values(backend, dtype):
    """The inputs are rounded to dtype first; the reference sees the same rounded values in float64."""
    logits, labels = make_case(2, 300, 12, n_bins_list=(15,), seed=5)
    # rounding to dtype can move a confidence onto a bin edge: keep only the samples where it did not
    conf = np.stack([np_row_stats(logits.to(dtype)[m].double().numpy(), labels.numpy())[0] for m in range(2)])
    keep = torch.from_numpy(far_from_edges(conf, (15,), margin=1e-6).all(axis=0))
    x, labels = logits.to(dtype)[:, keep], labels[keep]
    assert x.shape[1] > 250
    res = calibration(x, labels, 15, backend=backend)
    _check_against_numpy(res, x.double(), labels, 15, t=F32_TOL)


def test_hand_computed_case():
    # p(class 0), label:  0.85 y0 (correct, conf .85) | 0.30 y0 (wrong, conf .70) | 0.65 y1 (wrong, .65) | 0.10 y1
    p0 = torch.tensor([0.85, 0.30, 0.65, 0.10], dtype=torch.float64)
    logits = torch.stack([p0.log(), (1 - p0).log()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    r = calibration(logits, labels, n_bins=5, backend="torch")
    # bins of width .2: [.6,.8) holds .70,.65 (acc 0, conf .675); [.8,1] holds .85,.90 (acc 1, conf .875)
    assert r.ece.dim() == 0 and r.bin_count.tolist() == [0, 0, 0, 2, 2]
    assert r.ece.item() == pytest.approx(0.5 * 0.675 + 0.5 * 0.125)
    assert r.mce.item() == pytest.approx(0.675)
    assert r.mce_weighted.item() == pytest.approx(0.3375)
    assert r.rmsce.item() == pytest.approx(math.sqrt(0.5 * 0.675**2 + 0.5 * 0.125**2))
    assert r.accuracy.item() == pytest.approx(0.5)
    assert r.confidence.item() == pytest.approx(0.775)
    assert r.nll.item() == pytest.approx(-(math.log(0.85) + math.log(0.30) + math.log(0.35) + math.log(0.90)) / 4)
    assert r.brier.item() == pytest.approx((0.045 + 0.98 + 0.845 + 0.02) / 4)
    assert math.isnan(r.bin_accuracy[0].item()) and r.bin_accuracy[3:].tolist() == [0.0, 1.0]
    r2 = calibration(logits, labels, n_bins=2, backend="torch")  # equal-mass: {.65,.70} and {.85,.90}
    assert r2.ece.item() == pytest.approx(0.275)  # one width bin [.5, 1]: |0.5 - 0.775|
    assert r2.ace.item() == pytest.approx(0.5 * 0.675 + 0.5 * 0.125)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_matches_torchmetrics_l1_l2_max(n_bins):
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = make_case(3, 2000, 10, n_bins_list=(n_bins,), seed=11)
    x = logits.float()
    res = calibration(x, labels, n_bins, backend="cpp")
    for m in range(3):
        probs = x[m].softmax(-1)
        for norm, field in (("l1", "ece"), ("l2", "rmsce"), ("max", "mce")):
            want = multiclass_calibration_error(probs, labels, 10, n_bins=n_bins, norm=norm)
            assert_close(getattr(res, field)[m], want, name=f"{field} vs torchmetrics {norm}", **F32_TOL)


def test_matches_netcal():
    from netcal.metrics import ECE, MCE

    logits, labels = make_case(2, 1500, 6, n_bins_list=(10,), seed=4, saturated=5)
    res = calibration(logits, labels, 10, backend="cpp")
    for m in range(2):
        probs = torch.softmax(logits[m], -1).numpy()
        assert_close(res.ece[m], ECE(bins=10).measure(probs, labels.numpy()), name="ece vs netcal", **F32_TOL)
        assert_close(res.mce[m], MCE(bins=10).measure(probs, labels.numpy()), name="mce vs netcal", **F32_TOL)


def test_per_batch_ece_matches_torchmetrics_per_batch_loop():
    """CaRot: ECE per batch of 512 (torchmetrics, 10 bins), averaged weighted by batch size."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = make_case(2, 1300, 8, n_bins_list=(10,), seed=8)
    x = logits.float()
    res = calibration(x, labels, 10, per_batch=512, backend="cpp")
    for m in range(2):
        want = 0.0
        for s in range(0, 1300, 512):
            probs = x[m, s : s + 512].softmax(-1)
            n = probs.shape[0]
            want += n / 1300 * multiclass_calibration_error(probs, labels[s : s + 512], 8, n_bins=10).item()
        assert_close(res.ece_per_batch[m], want, name="ece_per_batch", **F32_TOL)
    assert not torch.allclose(res.ece_per_batch, res.ece), "per-batch and global ECE should differ on this data"


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_dac_convention_reproduces_reference_quirks(backend):
    logits, labels = make_case(3, 900, 7, n_bins_list=(10,), saturated=40, seed=21)
    res = calibration(logits, labels, 10, convention="dac", backend=backend)
    std = calibration(logits, labels, 10, backend=backend)
    for m in range(3):
        conf, pred, _, _ = np_row_stats(logits[m].numpy(), labels.numpy())
        correct = (pred == labels.numpy()).astype(np.float64)
        assert (conf == 1.0).sum() == 40
        assert_close(res.ece[m], dac_ece(conf, correct, 10), name="dac ece", **METRIC_TOL)
        assert_close(res.mce_weighted[m], dac_mce(conf, correct, 10), name="dac mce", **METRIC_TOL)
        assert_close(res.ace[m], dac_ace(conf, correct, 10), name="dac ace", **METRIC_TOL)
        assert_close(res.accuracy[m], 100 * correct.mean(), name="dac accuracy", **METRIC_TOL)
    # the quirk matters here: the saturated samples are out of the last bin's means
    assert not torch.allclose(res.ece, 100 * std.ece)
    assert torch.allclose(res.nll, std.nll) and torch.allclose(res.confidence, std.confidence)


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("binning", ["width", "mass"])
def test_streaming_equals_one_shot_exactly(squeeze, binning):
    logits, labels = make_case(3, 1000, 10, seed=2, saturated=3)
    x = logits.float()
    if squeeze:
        x = x[1]
    one = calibration(x, labels, 15, binning=binning, per_batch=128, backend="cpp")
    metric = CalibrationError(15, binning=binning, per_batch=128, backend="cpp")
    for s, e in ((0, 1), (1, 300), (300, 301), (301, 777), (777, 1000)):
        metric.update(x[..., s:e, :], labels[s:e])
    assert metric.n_samples == 1000
    st = metric.compute()
    for k in SCALARS + ["ece_per_batch", "bin_count", "bin_accuracy", "bin_confidence"]:
        a, b = getattr(one, k), getattr(st, k)
        assert a.shape == b.shape
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=1e-13, atol=0, equal_nan=True), k
    for k in ("ece", "ace", "mce", "mce_weighted", "accuracy", "bin_count", "ece_per_batch"):
        assert torch.equal(getattr(one, k), getattr(st, k)), f"{k} not bitwise equal"
    metric.reset()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()


def test_streaming_without_samples():
    logits, labels = make_case(2, 400, 5, seed=9)
    metric = CalibrationError(10, store_samples=False, backend="cpp")
    metric.update(logits[:, :150], labels[:150])
    metric.update(logits[:, 150:], labels[150:])
    res, one = metric.compute(), calibration(logits, labels, 10, backend="cpp")
    assert torch.isnan(res.ace).all()
    assert torch.allclose(res.ece, one.ece, rtol=1e-12) and torch.equal(res.bin_count, one.bin_count)
    with pytest.raises(ValueError, match="store_samples=False"):
        CalibrationError(10, store_samples=False, per_batch=4)


def test_streaming_rejects_mismatched_chunks():
    metric = CalibrationError(5, backend="torch")
    metric.update(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="like the first update"):
        metric.update(torch.randn(3, 4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="C = 3 classes"):
        metric.update(torch.randn(2, 4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="like the first update"):
        metric.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_mass_binning_makes_ece_equal_ace():
    logits, labels = make_case(2, 777, 6, seed=12)
    res = calibration(logits, labels, 12, binning="mass", backend="cpp")
    assert torch.allclose(res.ece, res.ace)
    assert res.bin_count.sum(1).tolist() == [777, 777]
    assert int(res.bin_count.max() - res.bin_count.min()) <= 1


def test_result_shapes_dict_and_table():
    res = calibration(torch.randn(50, 4), torch.randint(0, 4, (50,)), 8, backend="torch")
    assert isinstance(res, CalibrationResult) and res.ece.dim() == 0 and res.bin_count.shape == (8,)
    assert res.n_models == 1 and res.n_samples == 50
    d = res.to_dict()
    assert isinstance(d["ece"], float) and len(d["bin_count"]) == 8
    table = res.table(["only"])
    assert table.splitlines()[2].startswith("| only |") and "ece" in table.splitlines()[0]
    with pytest.raises(ValueError, match="model_names"):
        res.table(["a", "b"])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"binning": "quantile"}, ValueError, "binning"),
        ({"convention": "torchmetrics"}, ValueError, "convention"),
        ({"per_batch": 0}, ValueError, "per_batch"),
        ({"per_batch": 2.0}, TypeError, "per_batch"),
        ({"n_bins": 0}, ValueError, "n_bins"),
        ({"backend": "gpu"}, ValueError, "backend"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        calibration(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), **kwargs)


def test_docstring_examples_run():
    import doctest

    import importlib

    mod = importlib.import_module("vlmfast.metrics.calibration_error")

    failures, tried = doctest.testmod(mod, verbose=False)
    assert tried >= 1 and failures == 0


def make_logits(M, N, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, N, C, generator=g) * 2


def _storages(obj) -> set[int]:
    """Data pointers of the storages of every tensor reachable from a dataclass/list (one level deep)."""
    import dataclasses

    out = set()
    values = [getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(obj)
    for v in values:
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor) and t.numel():
                out.add(t.untyped_storage().data_ptr())
    return out


@pytest.mark.parametrize("store_samples", [True, False])
def test_results_never_share_storage_with_the_state(store_samples):
    """Issue: after one update, compute().bin_count *was* the state; zeroing it changed the next compute."""
    logits, labels = make_logits(2, 300, 5, seed=3), torch.randint(0, 5, (300,))
    metric = CalibrationError(n_bins=10, store_samples=store_samples)
    metric.update(logits, labels)
    r1 = metric.compute()
    state = _storages(metric._state.stats) | _storages(metric._state.confidence) | _storages(metric._state.correct)
    assert not (_storages(r1) & state)
    ece = r1.ece.clone()
    r1.bin_count.zero_()
    r1.ece.zero_()
    r2 = metric.compute()
    assert torch.equal(r2.ece, ece) and int(r2.bin_count.sum()) == 600


def test_streaming_state_is_merged_on_update():
    """store_samples=False: the state stays one set of (M, n_bins) sums however many chunks arrive."""
    metric = CalibrationError(n_bins=10, store_samples=False)
    one_shot = CalibrationError(n_bins=10, store_samples=False)
    all_logits, all_labels = make_logits(3, 500, 4, seed=5), torch.randint(0, 4, (500,))
    for i in range(0, 500, 10):
        metric.update(all_logits[:, i : i + 10], all_labels[i : i + 10])
    one_shot.update(all_logits, all_labels)
    st = metric._state
    assert st.confidence == [] and st.correct == []
    assert tuple(st.stats.bin_count.shape) == (3, 10) and st.stats.n_samples == 500
    a, b = metric.compute(), one_shot.compute()
    assert torch.equal(a.bin_count, b.bin_count)
    torch.testing.assert_close(a.ece, b.ece, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.nll, b.nll, atol=1e-12, rtol=1e-12)


def test_to_dict_is_strict_json():
    import json

    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [5.0, 0.0]])  # confidences near 1: most bins empty
    r = calibration(logits, torch.tensor([0, 1, 1]), n_bins=15, backend="torch")
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["bin_accuracy"][0] is None
    assert d["backends"] == {"calibration_bins": "torch", "equal_mass_bins": "torch"}


def test_validate_args_false_leaves_bad_rows_out():
    logits, labels = make_logits(1, 50, 3, seed=1)[0], torch.randint(0, 3, (50,))
    clean = calibration(logits[1:], labels[1:], 10, backend="torch")
    logits[0, 1] = float("inf")
    with pytest.raises(ValueError, match="sample 0, class 1"):
        calibration(logits, labels, 10)
    for backend in ("torch", "cpp"):
        r = calibration(logits[1:], labels[1:], 10, backend=backend, validate_args=False)
        torch.testing.assert_close(r.ece, clean.ece, atol=1e-6, rtol=0)
