"""calibration_bins numerics on every CPU backend (cpp, triton under the interpreter, torch), against float64:

* near-saturated rows (issue 7): the top logit 15-25 above the rest. conf == 1.0 exactly must happen exactly where
  an accurately summed float32 softmax rounds to 1 (1 + rest rounds to 1, rest = sum of the non-max terms), which
  away from a narrow band is also where float64 rounds to 1; NLL (log1p(rest)) and Brier accurate relative to
  their own tiny size; convention="dac" ECE equal to the DAC reference code;
* extreme finite logits (issue 8): +-3e38, +-FLT_MAX, the float16 and bfloat16 extremes, large C: NLL finite and
  equal to the float64 value.

The CUDA kernel's row math gets the same checks in csrc/tests/test_calibration_bins_row.cpp (section C)."""

import numpy as np
import pytest
import torch

from _tolerances import tol
from _utils import assert_close, dac_ece, make_case
from vlmfast import calibration
from vlmfast.ops.calibration_bins import calibration_bins

CPU_BACKENDS = ["cpp", "triton", "torch"]
OP = "calibration_bins"
# float32: 1 + r rounds to 1 iff r <= 2**-24; float32(1 / (1 + r)) is 1 iff r < ~2**-25. In between (the band) an
# accurately summed float32 softmax saturates and a float64 one rounded to float32 does not.
HI, LO = 2.0**-24, 2.0**-25
FLT_MAX = float(torch.finfo(torch.float32).max)


def _rest(x: torch.Tensor):
    """float64 oracle: the argmax (first on ties) and rest = sum_{c != argmax} exp(x_c - max) of each row."""
    x64 = x.double()
    pred = x64.argmax(-1)
    e = torch.exp(x64 - x64.amax(-1, keepdim=True)).scatter_(-1, pred.unsqueeze(-1), 0.0)
    return pred, e.sum(-1), (e * e).sum(-1)


def _near_saturated(N: int, C: int, where: str, dtype: torch.dtype, seed: int, ties: bool = True,
                    ramp: bool = False) -> torch.Tensor:
    """(N, C) rows whose top logit is 15-25 above the others (jittered by +-0.3), placed in the first, middle or
    last column, at vector/lane/tile boundaries (7, 8, 31, 32, 127, 128, ...) or anywhere; every 11th row (ties)
    has a second, tied top; with ``ramp``, every 3rd row's other logits rise by 2 along the row (a running max
    that moves from tile to tile). Rows within 0.1 % of a rounding boundary (2**-24, 2**-25) are dropped: there
    the outcome depends on the last bit of the sum of the small terms."""
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(N, generator=g, dtype=torch.float64) * 16 - 8
    gap = 15 + 10 * torch.rand(N, 1, generator=g, dtype=torch.float64)
    x = top[:, None] - gap + (torch.rand(N, C, generator=g, dtype=torch.float64) - 0.5) * 0.6
    rows = torch.arange(N)
    if ramp:
        x[::3] += torch.linspace(-1.0, 1.0, C, dtype=torch.float64)
    if where == "first":
        pos = torch.zeros(N, dtype=torch.long)
    elif where == "last":
        pos = torch.full((N,), C - 1)
    elif where == "middle":
        pos = torch.full((N,), C // 2)
    elif where == "boundaries":
        spots = torch.tensor(sorted({min(C - 1, s) for s in (7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511)}))
        pos = spots[rows % len(spots)]
    else:
        pos = torch.randint(0, C, (N,), generator=g)
    x[rows, pos] = top
    if ties:
        t = rows[rows % 11 == 5]
        x[t, (pos[t] + 1 + torch.randint(0, C - 1, (len(t),), generator=g)) % C] = top[t]
    x = x.to(dtype)
    _, rest, _ = _rest(x)
    keep = ((rest / HI - 1).abs() > 1e-3) & ((rest / LO - 1).abs() > 1e-3)
    return x[keep]


def _naive_saturated(x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """conf == 1.0 as the old kernels could round it: the max's 1 first, then each small term added in float32."""
    e = torch.exp(x.double() - x.double().amax(-1, keepdim=True)).float().scatter_(-1, pred.unsqueeze(-1), 0.0)
    s = torch.ones(x.shape[0])
    for c in range(x.shape[1]):
        s = s + e[:, c]
    return s == 1.0


# ---------------------------------------------------------------------------------------------------------
# Issue 7: saturated-confidence rounding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("C", [10, 100, 1000])
@pytest.mark.parametrize("where", ["first", "middle", "last", "boundaries", "random"])
def test_saturated_count_rounds_like_an_accurate_softmax(backend, C, where):
    x = _near_saturated(240 if C < 1000 else 120, C, where, torch.float32, seed=C + len(where))
    pred, rest, _ = _rest(x)
    labels = pred.clone()
    labels[1::2] = (pred[1::2] + 1) % C
    res = calibration_bins(x, labels, 15, return_samples=True, backend=backend)
    conf = res.confidence[0]
    accurate = (1.0 + rest).float() == 1.0  # an accurately summed float32 softmax
    f64 = (1.0 / (1.0 + rest)).float() == 1.0  # float64, rounded to float32
    band = (rest > LO) & (rest <= HI)
    torch_sm = torch.softmax(x, dim=-1).amax(-1) == 1.0
    # Coverage: both outcomes, rows in the band, rows the old summation order saturated wrongly.
    assert 0 < int(accurate.sum()) < len(x) and bool(band.any())
    assert bool((_naive_saturated(x, pred) & ~accurate).any())

    assert torch.equal(conf == 1.0, accurate), f"saturated rows differ: rest {rest[(conf == 1.0) != accurate][:4]}"
    assert torch.equal((conf == 1.0)[~band], f64[~band])
    assert res.saturated_count.item() == int(accurate.sum())
    assert res.saturated_correct.item() == int((accurate & (labels == pred)).sum())
    # torch.softmax (float32, CPU) adds the max's 1 to some small terms in its own vector lanes, so it saturates
    # a few rows that neither float64 nor an accurate sum does; wherever it agrees with float64 it is matched.
    agree = (torch_sm == f64) & ~band
    assert int(agree.sum()) > len(x) // 2
    assert torch.equal((conf == 1.0)[agree], torch_sm[agree])
    # The confidence itself: a few ulps of 1 / (1 + rest) (float32 summation of C terms against 2 with a tie).
    want = (1.0 / (1.0 + rest)).float()
    no_tie = rest < 0.5
    assert_close(conf[no_tie], want[no_tie], **tol(OP, torch.float32, "conf_near_saturated"), name="conf")
    assert_close(conf[~no_tie], want[~no_tie], **tol(OP, torch.float32, "conf"), name="conf (ties)")


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saturated_count_half_precision_inputs(backend, dtype):
    x = _near_saturated(300, 100, "random", dtype, seed=7)
    pred, rest, _ = _rest(x)
    res = calibration_bins(x, pred, 10, return_samples=True, backend=backend)
    accurate = (1.0 + rest).float() == 1.0
    assert 0 < int(accurate.sum()) < len(x)
    assert torch.equal(res.confidence[0] == 1.0, accurate)
    assert res.saturated_count.item() == int(accurate.sum())


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_float64_near_saturated_rows_never_saturate(backend):
    """In float64 a gap of 25 is far from saturation (rest >= 1e-11 >> 2**-53): conf == 1 / (1 + rest)."""
    x = _near_saturated(200, 100, "random", torch.float64, seed=11)
    pred, rest, _ = _rest(x)
    res = calibration_bins(x, pred, 15, return_samples=True, backend=backend)
    assert res.saturated_count.item() == 0
    assert_close(res.confidence[0], 1.0 / (1.0 + rest), **tol(OP, torch.float64, "conf_near_saturated"), name="conf")


@pytest.mark.parametrize("C", [100, 1000])
@pytest.mark.parametrize("pairs", [False, True])
def test_triton_max_across_column_tiles(C, pairs):
    """32-class tiles: the max (and its tie) in the first / last class of a tile, then rows whose max moves from
    tile to tile (the old max's 1 joins the rest), bf16 read as pairs or not."""
    from vlmfast.kernels.calibration_bins import calibration_bins_forward

    x = _near_saturated(200, C, "boundaries", torch.bfloat16 if pairs else torch.float32, seed=C, ramp=True)
    pred, rest, rest2 = _rest(x)
    M, N, nb = 1, len(x), 15
    outs = {
        "bin_count": torch.zeros(M, nb + 1, dtype=torch.int64),
        "bin_correct": torch.zeros(M, nb + 1, dtype=torch.int64),
        "bin_conf": torch.zeros(M, nb + 1, dtype=torch.float64),
        "sums": torch.zeros(M, 2, dtype=torch.float64),
        "nonfinite": torch.zeros(M, dtype=torch.int64),
        "sample_conf": torch.zeros(M, N, dtype=torch.float32),
        "sample_correct": torch.zeros(M, N, dtype=torch.bool),
    }
    calibration_bins_forward(x[None], pred[None], nb, outs, block_c=32, bf16_pairs=pairs)
    accurate = (1.0 + rest).float() == 1.0
    assert 0 < int(accurate.sum()) < N
    assert torch.equal(outs["sample_conf"][0] == 1.0, accurate)
    assert outs["bin_count"][0, nb].item() == int(accurate.sum())
    assert bool(outs["sample_correct"].all())
    no_tie = rest < 0.5
    want = (1.0 / (1.0 + rest)).float()
    assert_close(outs["sample_conf"][0][no_tie], want[no_tie], **tol(OP, torch.float32, "conf_near_saturated"),
                 name="conf")
    assert_close(outs["sums"][0, 0], torch.log1p(rest).sum(), **tol(OP, torch.float32, "tiny_sums"), name="nll")
    brier = (rest * rest + rest2) / (1 + rest) ** 2  # label = argmax (also with a tie)
    assert_close(outs["sums"][0, 1], brier.sum(), **tol(OP, torch.float32, "tiny_sums"), name="brier")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("C", [10, 1000])
def test_nll_and_brier_of_near_saturated_rows(backend, C):
    """Label = argmax: NLL = log1p(rest) and Brier = (rest^2 + rest2) / (1 + rest)^2, values of 1e-11..1e-6 that a
    float32 log(1 + rest) or 1 - 2 p + p^2 would round to 0 or to noise. Relative to themselves."""
    x = _near_saturated(200, C, "random", torch.float32, seed=3, ties=False)
    pred, rest, rest2 = _rest(x)
    res = calibration_bins(x, pred, 15, backend=backend)
    assert_close(res.nll_sum[0], torch.log1p(rest).sum(), **tol(OP, torch.float32, "tiny_sums"), name="nll")
    brier = (rest * rest + rest2) / (1 + rest) ** 2
    assert_close(res.brier_sum[0], brier.sum(), **tol(OP, torch.float32, "tiny_sums"), name="brier")
    # Label elsewhere: NLL ~ the gap, Brier ~ 2.
    other = (pred + 1) % C
    res = calibration_bins(x, other, 15, backend=backend)
    x64 = x.double()
    nll = torch.logsumexp(x64, -1) - x64.gather(-1, other[:, None])[:, 0]
    p = torch.softmax(x64, -1)
    brier = (p * p).sum(-1) - 2 * p.gather(-1, other[:, None])[:, 0] + 1
    assert_close(res.nll_sum[0] / len(x), nll.mean(), **tol(OP, torch.float32, "metric"), name="nll (other)")
    assert_close(res.brier_sum[0] / len(x), brier.mean(), **tol(OP, torch.float32, "metric"), name="brier (other)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dac_ece_matches_reference_with_near_saturated_rows(backend):
    """Issue 7's set: 3,000 samples, C = 10, 1 % of the rows with the top logit 17-20 above the rest (the old
    kernels saturated most of them: left out of the last bin's means, ECE off by up to 0.2 points)."""
    logits, labels = make_case(1, 3000, 10, n_bins_list=(15,), seed=5)
    logits = logits[0].float()
    g = torch.Generator().manual_seed(1)
    rows = torch.randperm(3000, generator=g)[:30]
    gap = 17 + 3 * torch.rand(30, 1, generator=g)
    near = logits[rows].amax(-1, keepdim=True) - gap + 0.2 * torch.rand(30, 10, generator=g)
    near[torch.arange(30), labels[rows]] = logits[rows].amax(-1) + 0.5
    logits[rows] = near
    pred, rest, _ = _rest(logits)
    # The reference's confidences: an accurately summed float32 softmax (torch.softmax on a GPU).
    conf = (1.0 / (1.0 + rest).float()).double().numpy()
    assert 0 < int((conf[rows] == 1.0).sum()) < 30
    assert bool((_naive_saturated(logits[rows], pred[rows]) & torch.from_numpy(conf[rows] < 1.0)).any())
    correct = (pred == labels).numpy().astype(np.float64)
    r = calibration(logits, labels, 15, convention="dac", backend=backend)
    np.testing.assert_allclose(r.ece.item(), dac_ece(conf, correct, 15), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Issue 8: NLL on extreme finite logits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_issue_8_nll_of_3e38(backend):
    r = calibration(torch.tensor([[3e38, -3e38, 0.0]]), torch.tensor([1]), backend=backend)
    assert torch.isfinite(r.nll).all()
    np.testing.assert_allclose(r.nll.item(), 6e38, rtol=1e-6)
    r = calibration(torch.tensor([[3e38, -3e38, 0.0]]), torch.tensor([2]), backend=backend)
    np.testing.assert_allclose(r.nll.item(), 3e38, rtol=1e-6)


def _extreme_rows(N: int, C: int, big: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 4, (N, C), generator=g)
    f64 = dict(dtype=torch.float64)
    vals = torch.stack([torch.full((N, C), -big, **f64), torch.zeros(N, C, **f64), torch.full((N, C), -big / 2, **f64),
                        3 * torch.randn(N, C, generator=g, **f64)])
    x = vals.gather(0, kind[None])[0]
    top = torch.randint(0, C, (N,), generator=g)
    top[0::3] = 0
    top[1::3] = C - 1
    x[torch.arange(N), top] = torch.where(torch.arange(N) % 5 == 4, 0.5, 1.0).to(torch.float64) * big
    x[3::7] = -big  # every logit at the bottom: conf 1 / C
    return x.to(dtype)


EXTREMES = [
    (torch.float32, FLT_MAX),
    (torch.float32, 3e38),
    (torch.bfloat16, float(torch.finfo(torch.bfloat16).max)),
    (torch.float16, float(torch.finfo(torch.float16).max)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype, big", EXTREMES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("C", [3, 100, 4096])
def test_nll_on_extreme_logits_matches_float64(backend, dtype, big, C):
    N = 60 if C < 4096 else 12
    x = _extreme_rows(N, C, big, dtype, seed=C)
    labels = torch.randint(0, C, (N,))
    labels[::4] = x[::4].float().argmax(-1)
    res = calibration_bins(x, labels, 15, return_samples=True, backend=backend)
    x64 = x.double()
    nll = torch.logsumexp(x64, -1) - x64.gather(-1, labels[:, None])[:, 0]
    p = torch.softmax(x64, -1)
    brier = (p * p).sum(-1) - 2 * p.gather(-1, labels[:, None])[:, 0] + 1
    assert bool(torch.isfinite(res.nll_sum).all()) and bool(torch.isfinite(res.brier_sum).all())
    assert_close(res.nll_sum[0], nll.sum(), atol=0, rtol=1e-6, name="nll_sum")
    assert_close(res.brier_sum[0] / N, brier.mean(), **tol(OP, dtype, "metric"), name="brier")
    assert_close(res.confidence[0], p.amax(-1), **tol(OP, dtype, "conf"), name="conf")
    assert torch.equal(res.correct[0], x64.argmax(-1) == labels)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nll_on_extreme_float64_logits(backend):
    big = 1e306  # per row NLL up to 2e306: 40 rows still sum to a finite float64
    x = _extreme_rows(40, 50, big, torch.float64, seed=2)
    labels = torch.randint(0, 50, (40,))
    res = calibration_bins(x, labels, 15, backend=backend)
    nll = torch.logsumexp(x, -1) - x.gather(-1, labels[:, None])[:, 0]
    assert bool(torch.isfinite(res.nll_sum).all())
    assert_close(res.nll_sum[0], nll.sum(), atol=0, rtol=1e-12, name="nll_sum")


# ---------------------------------------------------------------------------------------------------------
# The same checks on the GPU backends (run where a CUDA device is present)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [10, 100, 1000, 3000])
def test_gpu_saturated_count_and_tiny_sums(backend, dtype, C):
    x = torch.cat([_near_saturated(400, C, w, dtype, seed=C + i) for i, w in enumerate(("boundaries", "random"))])
    pred, rest, rest2 = _rest(x)
    res = calibration_bins(x.cuda(), pred.cuda(), 15, return_samples=True, backend=backend)
    accurate = (1.0 + rest).float() == 1.0
    assert 0 < int(accurate.sum()) < len(x)
    assert torch.equal(res.confidence[0].cpu() == 1.0, accurate)
    assert res.saturated_count.item() == int(accurate.sum())
    no_tie = rest < 0.5
    want = (1.0 / (1.0 + rest)).float()
    # ex2.approx: ~2 ulp per term, so rest to ~2e-7 relative: conf within a few ulps all the same.
    assert_close(res.confidence[0].cpu()[no_tie], want[no_tie], **tol(OP, torch.float32, "conf_near_saturated"),
                 name="conf")
    assert_close(res.nll_sum[0].cpu(), torch.log1p(rest).sum(), **tol(OP, torch.float32, "tiny_sums"), name="nll")
    brier = (rest * rest + rest2) / (1 + rest) ** 2
    assert_close(res.brier_sum[0].cpu(), brier.sum(), **tol(OP, torch.float32, "tiny_sums"), name="brier")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype, big", EXTREMES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("C", [3, 100, 4096])
def test_gpu_nll_on_extreme_logits(backend, dtype, big, C):
    x = _extreme_rows(64, C, big, dtype, seed=C)
    labels = torch.randint(0, C, (64,))
    res = calibration_bins(x.cuda(), labels.cuda(), 15, return_samples=True, backend=backend)
    x64 = x.double()
    nll = torch.logsumexp(x64, -1) - x64.gather(-1, labels[:, None])[:, 0]
    assert bool(torch.isfinite(res.nll_sum).all())
    assert_close(res.nll_sum[0].cpu(), nll.sum(), atol=0, rtol=1e-6, name="nll_sum")
    assert_close(res.confidence[0].cpu(), torch.softmax(x64, -1).amax(-1), **tol(OP, dtype, "conf"), name="conf")
