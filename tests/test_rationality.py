"""vlmfast.metrics.rationality: PT / IR / RMA against hand-counted cases and a per-sample loop, constant heatmaps
counted invalid (the reference's NaN quirk fixed), empty denominators, masks from boxes and their resizing, and bad
input."""

from __future__ import annotations

import math

import pytest
import torch

from vlmfast.metrics import masks_from_boxes, rationality, resize_masks


def _loop(h, m, c, thr):
    """The definition applied one sample at a time in float64."""
    rr = rw = wr = ww = 0
    rmas = []
    for hi, mi, ci in zip(h.double(), m, c.tolist()):
        const = float(hi.max()) == float(hi.min())
        rma = math.nan if const else float((hi * mi).sum() / hi.sum())
        valid = (not const) and rma >= thr
        rr += ci and valid
        rw += ci and not valid
        wr += (not ci) and valid
        ww += (not ci) and not valid
        rmas.append(rma)
    return rr, rw, wr, ww, rmas


def test_hand_counted_case():
    m = torch.zeros(4, 2, 2, dtype=torch.bool)
    m[:, 0, 0] = True  # the object is the top-left pixel
    h = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],     # all mass inside      -> RMA 1   valid
                      [[0.2, 0.8], [0.0, 0.0]],     # 0.2 inside           -> RMA .2  invalid
                      [[0.5, 0.5], [0.0, 0.0]],     # exactly at threshold -> RMA .5  valid
                      [[0.1, 0.3], [0.3, 0.3]]])    # 0.1 of 1.0           -> RMA .1  invalid
    c = torch.tensor([True, True, False, False])
    r = rationality(h, m, c)
    assert r.counts == {"RR": 1, "RW": 1, "WR": 1, "WW": 1}
    assert r.pt == pytest.approx(0.5) and r.ir == pytest.approx(0.5)
    torch.testing.assert_close(r.rma, torch.tensor([1.0, 0.2, 0.5, 0.1]))
    assert r.mean_rma_correct == pytest.approx(0.6)
    assert rationality(h, m, c, threshold=0.15).counts == {"RR": 2, "RW": 0, "WR": 1, "WW": 1}


def test_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    n = 300
    h = torch.rand(n, 16, 16, generator=g) ** 3
    m = torch.rand(n, 16, 16, generator=g) > 0.7
    h[5] = 0.0  # constant (all zero)
    h[6] = 0.3  # constant
    c = torch.rand(n, generator=g) > 0.4
    r = rationality(h, m, c, threshold=0.35)
    rr, rw, wr, ww, rmas = _loop(h, m, c, 0.35)
    assert r.counts == {"RR": rr, "RW": rw, "WR": wr, "WW": ww}
    assert r.n_constant == 2 and not r.valid[5] and not r.valid[6] and math.isnan(float(r.rma[5]))
    torch.testing.assert_close(r.rma.double(), torch.tensor(rmas, dtype=torch.float64), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    assert r.pt == pytest.approx(rr / (rr + rw)) and r.ir == pytest.approx(rr / (rr + wr))


def test_constant_heatmap_is_invalid_and_empty_denominators_are_nan():
    h = torch.ones(2, 3, 3)
    m = torch.ones(2, 3, 3, dtype=torch.bool)
    r = rationality(h, m, torch.tensor([True, False]))
    assert r.counts == {"RR": 0, "RW": 1, "WR": 0, "WW": 1} and r.n_constant == 2
    assert r.pt == 0.0 and math.isnan(r.ir) and math.isnan(r.mean_rma_correct)
    empty = rationality(torch.zeros(0, 3, 3), torch.zeros(0, 3, 3, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert math.isnan(empty.pt) and math.isnan(empty.ir) and empty.counts["RR"] == 0
    assert rationality(h, m, torch.tensor([True, False])).as_dict(percent=True)["pt"] == 0.0


def test_masks_from_boxes_and_resize():
    m = masks_from_boxes(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), (4, 5))
    want = torch.zeros(1, 4, 5, dtype=torch.bool)
    want[0, 0:2, 1:3] = True
    assert torch.equal(m, want)
    union = masks_from_boxes([torch.tensor([[0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 4.0]]), torch.zeros(0, 4)], 4)
    assert int(union[0].sum()) == 2 and bool(union[0, 0, 0]) and bool(union[0, 3, 3]) and int(union[1].sum()) == 0
    big = resize_masks(want, (8, 10))
    assert big.shape == (1, 8, 10) and int(big.sum()) == 4 * int(want.sum())
    assert torch.equal(big[0, 0:4, 2:6], torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("args,exc,match", [
    ((torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)), ValueError,
     r"heatmaps: expected shape \(N, H, W\)"),
    ((torch.ones(2, 3, 3), torch.ones(2, 3, 3), torch.ones(2, dtype=torch.bool)), TypeError, "masks: expected a bool"),
    ((torch.ones(2, 3, 3), torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)), ValueError,
     "masks: expected the heatmaps' shape"),
    ((torch.ones(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)), ValueError,
     r"correct: expected shape \(2,\)"),
    ((-torch.ones(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)), ValueError,
     "non-negative"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        rationality(*args)
    with pytest.raises(ValueError, match="threshold"):
        rationality(torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, dtype=torch.bool), 1.5)


def test_masks_from_polygons():
    from vlmfast.metrics import masks_from_boxes, masks_from_polygons

    # an axis-aligned rectangle polygon equals the box mask; a flat COCO list equals the (V, 2) form
    rect = [[2, 1], [7, 1], [7, 5], [2, 5]]
    got = masks_from_polygons([[rect], [[2, 1, 7, 1, 7, 5, 2, 5]]], (8, 10))
    want = masks_from_boxes(torch.tensor([[2.0, 1, 7, 5]]), (8, 10))[0]
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    # a right triangle: pixel centres with x + 0.5 < y + 0.5 (strictly below the diagonal) are inside
    tri = masks_from_polygons([[[[0, 0], [0, 6], [6, 6]]]], 6)[0]
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(tri, xx < yy)
    # the union of two polygons; even-odd for a self-overlapping outline is per polygon, the union across them
    two = masks_from_polygons([[rect, [[0, 6], [3, 6], [3, 8], [0, 8]]]], (8, 10))[0]
    assert int(two.sum()) == 5 * 4 + 3 * 2
    assert masks_from_polygons([[]], 4).sum() == 0  # no polygon: empty mask
    with pytest.raises(ValueError, match=r"polygons\[0\]\[0\]: expected \(V, 2\) vertices with V >= 3"):
        masks_from_polygons([[[[0, 0], [1, 1]]]], 4)
    with pytest.raises(TypeError, match="polygons: expected a list"):
        masks_from_polygons(torch.zeros(3, 2), 4)
