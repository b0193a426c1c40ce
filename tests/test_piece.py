"""PIECE and the k-NN proximity against brute-force numpy and the DAC/DOR reference semantics."""

import numpy as np
import pytest
import torch

from _utils import _errors_from_groups, assert_close, dac_piece, make_case, np_mass_bins, np_row_stats, np_width_bins
from vlmfast.metrics import piece, proximity


def np_proximity(f, ref, k, exclude_self=False):
    d = np.linalg.norm(f[:, None, :] - ref[None, :, :], axis=-1)
    d.sort(axis=1)
    d = d[:, 1 : k + 1] if exclude_self else d[:, :k]
    return np.exp(-d.mean(axis=1))


def np_piece(conf, correct, prox, n_bins, prox_bins):
    pg = np_mass_bins(prox, prox_bins)
    cg = np_width_bins(conf, n_bins)
    return _errors_from_groups(conf, correct, pg * 10_000 + cg, len(conf))[0]


@pytest.mark.parametrize("exclude_self", [False, True])
def test_proximity_matches_brute_force(exclude_self):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(301, 17))
    ref = f if exclude_self else rng.normal(size=(97, 17))
    got = proximity(torch.from_numpy(f), torch.from_numpy(ref), k=5, exclude_self=exclude_self, chunk_size=64)
    assert_close(got, np_proximity(f, ref, 5, exclude_self), atol=1e-10, rtol=1e-10, name="proximity")


def test_proximity_per_model_features():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 50, 8))
    ref = rng.normal(size=(3, 40, 8))
    got = proximity(torch.from_numpy(f), torch.from_numpy(ref), k=3)
    assert got.shape == (3, 50)
    for m in range(3):
        assert_close(got[m], np_proximity(f[m], ref[m], 3), atol=1e-10, rtol=1e-10, name="proximity")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("convention", ["standard", "dac"])
def test_piece_matches_independent_implementation(backend, convention):
    logits, labels = make_case(2, 600, 8, n_bins_list=(10,), seed=7, saturated=6)
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(600, 12))
    feats[:300] *= 0.5  # half the samples sit close to the reference set
    ref = rng.normal(size=(200, 12)) * 0.5
    got = piece(logits, labels, torch.from_numpy(feats), torch.from_numpy(ref), k=5, n_bins=10,
                convention=convention, backend=backend)
    prox = np_proximity(feats, ref, 5)
    for m in range(2):
        conf, pred, _, _ = np_row_stats(logits[m].numpy(), labels.numpy())
        correct = (pred == labels.numpy()).astype(np.float64)
        want = dac_piece(conf, correct, prox) if convention == "dac" else np_piece(conf, correct, prox, 10, 10)
        assert_close(got[m], want, atol=1e-9, rtol=1e-9, name=f"piece model {m}")
    # precomputed proximities give the same number
    again = piece(logits, labels, proximities=torch.from_numpy(prox), convention=convention, backend=backend)
    assert torch.allclose(again, got, rtol=1e-12)


def test_piece_is_at_least_ece_and_sees_proximity_dependent_miscalibration():
    """A model over-confident only on samples far from the reference data: PIECE > ECE (ECE averages it out)."""
    from vlmfast.metrics import calibration

    rng = np.random.default_rng(3)
    N, C = 4000, 5
    near = np.arange(N) < N // 2
    feats = rng.normal(size=(N, 6)) * np.where(near, 0.3, 3.0)[:, None]
    ref = rng.normal(size=(500, 6)) * 0.3
    labels = rng.integers(0, C, N)
    # confidence 0.8 everywhere; accuracy 0.95 near (under-confident), 0.65 far (over-confident)
    correct = rng.random(N) < np.where(near, 0.95, 0.65)
    pred = np.where(correct, labels, (labels + 1) % C)
    logits = np.full((N, C), 0.0)
    logits[np.arange(N), pred] = np.log(0.8 / 0.2 * (C - 1))
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    ece = calibration(x, y, 10, backend="cpp").ece.item()
    p = piece(x, y, torch.from_numpy(feats), torch.from_numpy(ref), n_bins=10, backend="cpp").item()
    assert ece < 0.02 and p > 0.12


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"features": torch.randn(9, 4), "reference_features": torch.randn(5, 4)}, ValueError, "expected 10 rows"),
        ({"features": torch.randn(10, 4), "reference_features": torch.randn(5, 3)}, ValueError, "dimension D = 4"),
        ({"features": torch.randn(10, 4), "reference_features": torch.randn(3, 4)}, ValueError, "k: expected"),
        ({"features": torch.randn(10, 4)}, ValueError, "both are required"),
        ({"features": torch.ones(10, 4, dtype=torch.long), "reference_features": torch.randn(8, 4)}, TypeError, "floating"),
        ({"proximities": torch.rand(7)}, ValueError, r"proximities: expected shape \(10,\)"),
        ({"proximities": torch.rand(10), "features": torch.randn(10, 4)}, ValueError, "not both"),
        ({"features": torch.full((10, 4), float("nan")), "reference_features": torch.randn(8, 4)}, ValueError, "finite"),
        ({"proximity_bins": 0, "proximities": torch.rand(10)}, ValueError, "proximity_bins"),
    ],
)
def test_piece_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        piece(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), backend="torch", **kwargs)
