"""vlmfast.data.shifts: the scikit-learn digits source shift and the ImageNet-C-style corruptions."""

import numpy as np
import pytest
import torch

import vlmfast.data as D
from test_data import assert_ground_truth
from vlmfast.data import REGION_DIGIT


@pytest.fixture(scope="module")
def digits():
    return D.sklearn_digits(seed=0)


@pytest.fixture(scope="module")
def clean():
    return D.spurious_mnist("test", n=300, seed=0, cache=False)


# ---------------------------------------------------------------------- sklearn digits


def test_sklearn_digits_ground_truth(digits):
    assert digits.split == "shift-digits" and digits.source == "sklearn-digits" and len(digits) == 1797
    assert_ground_truth(digits)
    assert sorted(digits.source_ids.tolist()) == list(range(1797))  # n=None: every scan exactly once


def test_sklearn_digits_labels_and_square_independent(digits):
    from sklearn.datasets import load_digits

    target = torch.from_numpy(load_digits().target).long()
    assert torch.equal(target[digits.source_ids], digits.labels)
    table = digits.contingency().numpy()
    assert np.abs(table[:, 1] - table.sum(1) / 2).max() <= 0.5 and digits.cramers_v < 0.05


def test_sklearn_digits_mnist_framing(digits):
    # the stroke box lies in the central 20×20 of the digit's quadrant (a 4-pixel border, as MNIST)
    q = (digits.region_labels == REGION_DIGIT).long().argmax(1)
    origin = torch.tensor(D.QUADRANT_BOXES)[q][:, :2]
    b = digits.digit_boxes
    assert ((b[:, :2] - origin) >= 4).all() and ((b[:, 2:] - origin) <= 24).all()
    # and the digits fill that frame like MNIST's do: boxes mostly 10..20 px tall
    heights = (b[:, 3] - b[:, 1]).float()
    assert 12 <= heights.median() <= 20
    # the strokes reach full white and the grey levels are not MNIST's (a real shift)
    assert int(digits.images.max()) == 255


def test_sklearn_digits_n_and_seed():
    a = D.sklearn_digits(n=250, seed=1)
    b = D.sklearn_digits(n=250, seed=1)
    c = D.sklearn_digits(n=250, seed=2)
    assert len(a) == 250 and torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    assert_ground_truth(a)
    big = D.sklearn_digits(n=2500, seed=0)
    assert len(big) == 2500 and len(set(big.source_ids.tolist())) == 1797  # all scans used, reused evenly
    with pytest.raises(ValueError, match="^n: expected"):
        D.sklearn_digits(n=0)
    with pytest.raises(TypeError, match="^seed: expected"):
        D.sklearn_digits(seed=1.5)


# ---------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("kind", D.CORRUPTIONS)
def test_corruption_monotone_in_severity(clean, kind):
    x = clean.images
    diffs = []
    for s in range(1, 6):
        y = D.corrupt(x, kind, s, seed=0)
        assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
        diffs.append((y.float() - x.float()).abs().mean().item())
    assert all(b > a for a, b in zip(diffs, diffs[1:])), (kind, diffs)
    assert diffs[4] > 1.5 * diffs[0] if kind != "invert" else diffs[4] > diffs[0] + 50, (kind, diffs)
    assert diffs[0] > 0.2, (kind, diffs)  # severity 1 does change the images


@pytest.mark.parametrize("kind", D.CORRUPTIONS)
def test_corruption_deterministic(clean, kind):
    x = clean.images[:64]
    assert torch.equal(D.corrupt(x, kind, 3, seed=4), D.corrupt(x, kind, 3, seed=4))
    if kind in ("noise", "occlusion"):
        assert not torch.equal(D.corrupt(x, kind, 3, seed=4), D.corrupt(x, kind, 3, seed=5))
    assert torch.equal(x, clean.images[:64])  # input untouched


def test_corruptions_nested_per_pixel(clean):
    x = clean.images[:100].float()
    for kind in ("noise", "occlusion", "contrast"):
        prev = torch.zeros_like(x)
        for s in range(1, 6):
            d = (D.corrupt(clean.images[:100], kind, s).float() - x).abs()
            assert (d >= prev - 1).all(), (kind, s)  # grows pixel by pixel (up to rounding)
            prev = d


def test_invert(clean):
    x = clean.images[:50]
    y = D.corrupt(x, "invert", 5)
    assert torch.equal(y, 255 - x) and torch.equal(D.corrupt(y, "invert", 5), x)
    half = D.corrupt(x, "invert", 1)
    # a blend toward the inversion (factor 0.6 at severity 1): black becomes 0.6 * 255
    assert int(half[x == 0].min()) == int(half[x == 0].max()) == round(0.6 * 255)


def test_contrast_and_blur_keep_the_mean(clean):
    x = clean.images[:50].float()
    for kind in ("contrast", "blur"):
        y = D.corrupt(clean.images[:50], kind, 5).float()
        assert (y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))).abs().max() < 1.0, kind


def test_occlusion_only_blackens(clean):
    x = clean.images[:100]
    y = D.corrupt(x, "occlusion", 5)
    changed = y != x
    assert changed.any() and (y[changed] == 0).all()


def test_corrupt_bad_arguments(clean):
    x = clean.images[:4]
    with pytest.raises(ValueError, match="^kind: expected"):
        D.corrupt(x, "fog", 1)
    for sev in (0, 6):
        with pytest.raises(ValueError, match="^severity: expected"):
            D.corrupt(x, "noise", sev)
    with pytest.raises(TypeError, match="^severity: expected"):
        D.corrupt(x, "noise", 2.0)
    with pytest.raises(TypeError, match="^images: expected"):
        D.corrupt(x.float(), "noise", 1)
    with pytest.raises(TypeError, match="^images: expected"):
        D.corrupt(x.numpy(), "noise", 1)
    with pytest.raises(ValueError, match="^images: expected"):
        D.corrupt(x[0], "noise", 1)
    assert D.corrupt(x[:0], "blur", 2).shape == (0, 3, 56, 56)


def test_corrupted_test_keeps_ground_truth(clean):
    ds = D.corrupted_test("blur", 4, n=300, seed=0, cache=False)
    assert ds.split == "test-blur-4" and ds.params["corruption"] == "blur"
    assert not torch.equal(ds.images, clean.images)
    assert torch.equal(ds.images, D.corrupt(clean.images, "blur", 4, seed=0))
    for name in ("labels", "boxes", "digit_masks", "has_spurious", "square_boxes", "region_labels"):
        assert torch.equal(getattr(ds, name), getattr(clean, name)), name
    assert ds.captions == clean.captions
    assert_ground_truth(ds, clean=False)
    with pytest.raises(ValueError, match="^kind"):
        D.corrupted_test("snow", 1, n=10, cache=False)
