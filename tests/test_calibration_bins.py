"""The op calibration_bins: every backend against the torch reference and an independent numpy implementation."""

import numpy as np
import pytest
import torch

from _tolerances import tol
from _utils import assert_bins_match, assert_close, make_case, np_row_stats, np_width_bins
from vlmfast import BackendError
from vlmfast.ops.calibration_bins import calibration_bins, calibration_bins_ref

CPU_BACKENDS = ["cpp", "triton", "torch"]
OP = "calibration_bins"


def _compare(res, ref, dtype, n_bins):
    assert res.n_bins == ref.n_bins == n_bins
    assert_bins_match(res, ref, ref.confidence, n_bins)
    t = tol(OP, dtype, "sums")
    N = res.n_samples
    assert_close(res.bin_conf_sum / N, ref.bin_conf_sum / N, name="bin_conf_sum", **t)
    assert_close(res.nll_sum / N, ref.nll_sum / N, name="nll_sum", **t)
    assert_close(res.brier_sum / N, ref.brier_sum / N, name="brier_sum", **t)
    assert_close(res.confidence, ref.confidence, name="confidence", **tol(OP, dtype, "conf"))
    assert torch.equal(res.correct.cpu(), ref.correct.cpu()), "correct differs"


SHAPES = [(1, 1, 2), (1, 97, 1023), (3, 1023, 10), (2, 5, 1), (4, 129, 100)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends_match_reference(backend, shape, dtype):
    M, N, C = shape
    logits = (torch.randn(M, N, C) * 3).to(dtype)
    labels = torch.randint(0, C, (N,))
    n_bins = 15
    ref = calibration_bins_ref(logits, labels, n_bins, return_samples=True)
    res = calibration_bins(logits, labels, n_bins, return_samples=True, backend=backend)
    assert res.backend == backend
    _compare(res, ref, dtype, n_bins)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_float64_matches_numpy_exactly(backend):
    logits, labels = make_case(3, 400, 7, n_bins_list=(15,), saturated=5, tied=3)
    res = calibration_bins(logits, labels, 15, return_samples=True, backend=backend)
    for m in range(3):
        conf, pred, nll, brier = np_row_stats(logits[m].numpy(), labels.numpy())
        b = np_width_bins(conf, 15)
        np.testing.assert_array_equal(res.bin_count[m].numpy(), np.bincount(b, minlength=15))
        correct = pred == labels.numpy()
        np.testing.assert_array_equal(res.bin_correct[m].numpy(), np.bincount(b, weights=correct, minlength=15))
        np.testing.assert_allclose(res.nll_sum[m].item(), nll.sum(), rtol=1e-10)
        np.testing.assert_allclose(res.brier_sum[m].item(), brier.sum(), rtol=1e-10)
        np.testing.assert_allclose(res.confidence[m].numpy(), conf.astype(np.float32), rtol=1e-6)
        assert res.saturated_count[m].item() == 5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_matches_numpy_float64(backend):
    """Away from bin edges, the float32 kernels bin exactly like a float64 numpy evaluation."""
    logits, labels = make_case(2, 300, 11, n_bins_list=(10,), seed=3)
    res = calibration_bins(logits.float(), labels, 10, return_samples=True, backend=backend)
    for m in range(2):
        conf, pred, nll, brier = np_row_stats(logits[m].numpy(), labels.numpy())
        b = np_width_bins(conf, 10)
        np.testing.assert_array_equal(res.bin_count[m].numpy(), np.bincount(b, minlength=10))
        np.testing.assert_array_equal(res.correct[m].numpy(), pred == labels.numpy())
        t = tol(OP, torch.float32, "metric")
        np.testing.assert_allclose(res.nll_sum[m].item() / 300, nll.mean(), rtol=t["rtol"], atol=t["atol"])
        np.testing.assert_allclose(res.brier_sum[m].item() / 300, brier.mean(), rtol=t["rtol"], atol=t["atol"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_per_model_labels(backend):
    M, N, C = 3, 203, 37
    base = torch.randn(C, N * 2, M) * 2  # permuted and strided: no unit stride along C
    logits = base.permute(2, 1, 0)[:, ::2, :]
    assert not logits.is_contiguous()
    labels = torch.randint(0, C, (M, N)).t().contiguous().t()  # (M, N), non-contiguous
    ref = calibration_bins_ref(logits.contiguous(), labels.contiguous(), 12, return_samples=True)
    res = calibration_bins(logits, labels, 12, return_samples=True, backend=backend)
    _compare(res, ref, torch.float32, 12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saturated_confidence_lands_in_last_bin(backend):
    C = 50
    logits = torch.randn(2, 64, C)
    logits[:, :10] = 0.0
    logits[:, :10, 7] = 100.0  # softmax saturates: confidence exactly 1.0 in float32
    labels = torch.full((64,), 7)
    res = calibration_bins(logits, labels, 10, return_samples=True, backend=backend)
    assert torch.all(res.confidence[:, :10] == 1.0)
    assert res.saturated_count.tolist() == [10, 10]
    assert res.saturated_correct.tolist() == [10, 10]
    assert bool((res.bin_count[:, -1] >= 10).all())
    assert res.bin_count.sum().item() == 128


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_resolve_to_lowest_index(backend):
    C = 1023
    logits = torch.full((1, 4, C), -1.0)
    logits[0, 0] = 0.5  # all equal -> class 0
    logits[0, 1, [5, 700]] = 3.0  # tie spread far apart along C -> class 5
    logits[0, 2, [1022, 600]] = 2.0  # -> 600
    logits[0, 3, 1022] = 9.0
    labels = torch.tensor([0, 5, 600, 1022])
    res = calibration_bins(logits, labels, 15, return_samples=True, backend=backend)
    assert res.correct.tolist() == [[True, True, True, True]]
    np.testing.assert_allclose(res.confidence[0, 0].item(), 1.0 / C, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_bins", [1, 2, 100])
def test_bin_counts_sum_to_n(backend, n_bins):
    logits = torch.randn(2, 77, 9) * 4
    labels = torch.randint(0, 9, (2, 77))
    res = calibration_bins(logits, labels, n_bins, backend=backend)
    assert res.bin_count.shape == (2, n_bins)
    assert res.bin_count.sum(dim=1).tolist() == [77, 77]
    assert bool((res.bin_correct <= res.bin_count).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_logits_are_reported_with_location(backend):
    logits = torch.randn(3, 20, 5)
    logits[1, 4, 2] = float("nan")
    logits[2, 7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model 1, sample 4, class 2"):
        calibration_bins(logits, torch.randint(0, 5, (20,)), backend=backend)
    one = torch.randn(6, 4)
    one[5, 3] = -float("inf")
    with pytest.raises(ValueError, match=r"sample 5, class 3"):
        calibration_bins(one, torch.zeros(6, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_rows_do_not_leak_into_other_rows(backend):
    """Direct kernel entry: a NaN row is counted and skipped; every other row is unchanged."""
    from vlmfast.ops.calibration_bins import _carve

    logits = torch.randn(2, 40, 6)
    labels = torch.randint(0, 6, (2, 40))
    clean = calibration_bins(logits[:, 1:], labels[:, 1:], 15, return_samples=True, backend="torch")
    logits[:, 0, 3] = float("nan")
    ints, flts, _, _ = torch.ops.vlmfast.calibration_bins(logits, labels, 15, True, backend)
    outs = _carve(ints, flts, 2, 15)
    assert outs["nonfinite"].tolist() == [1, 1]
    assert outs["bin_count"].sum(dim=1).tolist() == [39, 39]
    assert_close(outs["sums"][:, 0], clean.nll_sum, atol=1e-4, rtol=1e-5, name="nll_sum")
    assert torch.isfinite(outs["bin_conf"]).all() and torch.isfinite(outs["sums"]).all()


@pytest.mark.parametrize(
    "logits, labels, exc, match",
    [
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "logits: expected float"),
        (torch.zeros(4, 3), torch.zeros(4), TypeError, "labels: expected an integer"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), ValueError, r"labels: expected shape \(4,\)"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 3, 0]), ValueError, r"labels: expected values in \[0, 3\).*got 3"),
        (torch.zeros(4, 3), torch.tensor([0, -1, 2, 0]), ValueError, "got -1 at sample 1"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(2, 4, 0), torch.zeros(4, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.long), ValueError, r"logits: expected shape \(N, C\)"),
        (torch.zeros(2, 4, 3), torch.zeros(3, 4, dtype=torch.long), ValueError, r"labels: expected shape"),
    ],
)
def test_bad_input_errors(logits, labels, exc, match):
    with pytest.raises(exc, match=match):
        calibration_bins(logits, labels, backend="torch")


@pytest.mark.parametrize("n_bins, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_n_bins(n_bins, exc):
    with pytest.raises(exc, match="n_bins"):
        calibration_bins(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), n_bins)


def test_forced_backend_that_cannot_run_lists_every_backend():
    with pytest.raises(BackendError) as ei:
        calibration_bins(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), backend="triton")
    msg = str(ei.value)
    for name in ("triton", "cuda", "cpp", "torch"):
        assert f"  {name}:" in msg
    assert "float64 unsupported" in msg


def test_numpy_inputs_are_accepted():
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    y = np.arange(10) % 4
    res = calibration_bins(x, y, 5, backend="cpp")
    ref = calibration_bins_ref(torch.from_numpy(x), torch.from_numpy(y), 5)
    assert torch.equal(res.bin_count, ref.bin_count)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", SHAPES + [(5, 4099, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, shape, dtype):
    M, N, C = shape
    logits = (torch.randn(M, N, C, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, C, (N,), device="cuda")
    ref = calibration_bins_ref(logits, labels, 15, return_samples=True)
    res = calibration_bins(logits, labels, 15, return_samples=True, backend=backend)
    _compare(res, ref, dtype, 15)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_non_contiguous_saturated_nonfinite(backend):
    base = torch.randn(33, 1030, 3, device="cuda")
    logits = base.permute(2, 1, 0)[:, ::2]
    logits[:, :4] = 0.0
    logits[:, :4, 1] = 100.0
    labels = torch.randint(0, 33, (515,), device="cuda")
    ref = calibration_bins_ref(logits, labels, 10, return_samples=True)
    res = calibration_bins(logits, labels, 10, return_samples=True, backend=backend)
    _compare(res, ref, torch.float32, 10)
    assert res.saturated_count.tolist() == [4, 4, 4]
    logits[2, 9, 5] = float("nan")
    with pytest.raises(ValueError, match="model 2, sample 9, class 5"):
        calibration_bins(logits, labels, backend=backend)
