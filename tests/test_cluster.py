"""vlmfast.cluster: matrix-free cosine k-medoids, silhouette and the RaVL sweep against the reference's own
stack (scikit-learn-extra KMedoids on the dense clipped matrix, scikit-learn silhouette_score)."""

import math
import warnings

import numpy as np
import pytest
import torch

from _ravl_reference import reference_cluster, reference_distance, reference_kmedoids_class
from vlmfast.cluster import PairCorrections, kmedoids, medoids_of, silhouette, sweep

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn 1.9 deprecates stable_cumsum, used by sklearn-extra


def _blobs(seed, n, d, c, spread):
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(c, d))
    x = cent[rng.integers(0, c, n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CASES = [(0, 300, 16, 5, 0.3), (1, 97, 8, 3, 0.5), (2, 500, 64, 12, 0.8), (3, 211, 7, 4, 1.5)]


@pytest.mark.parametrize("case", CASES)
def test_kmedoids_equals_scikit_learn_extra_on_the_clipped_matrix(case):
    x = _blobs(*case)
    d = reference_distance(x)
    km = reference_kmedoids_class()
    for k in (2, case[3], case[3] + 3):
        ref = km(n_clusters=k, random_state=0, metric="precomputed", init="k-medoids++").fit(d)
        ours = kmedoids(x, k, metric="dot", clip_distances=True)
        np.testing.assert_array_equal(ours.medoids.numpy(), ref.medoid_indices_)
        np.testing.assert_array_equal(ours.labels.numpy(), ref.labels_)
        assert ours.n_iter == ref.n_iter_ + 1  # the reference counts from 0
        assert ours.inertia == pytest.approx(float(d[ref.medoid_indices_].min(0).sum()), rel=1e-5)


def test_unclipped_kmedoids_equals_the_dense_unclipped_algorithm():
    """clip_distances=False is the same algorithm on 1 - x.y (the dense oracle with the unclipped matrix)."""
    x = _blobs(4, 250, 12, 4, 1.0)
    d = 1.0 - x @ x.T
    np.fill_diagonal(d, 0)
    assert (d > 1).any()  # negative similarities exist, so clipping would matter
    km = reference_kmedoids_class()
    for k in (3, 6):
        ref = km(n_clusters=k, random_state=0, metric="precomputed", init="k-medoids++").fit(d)
        ours = kmedoids(x, k, metric="dot", clip_distances=False)
        np.testing.assert_array_equal(ours.medoids.numpy(), ref.medoid_indices_)
        np.testing.assert_array_equal(ours.labels.numpy(), ref.labels_)


@pytest.mark.parametrize("clip", [True, False])
def test_silhouette_equals_scikit_learn(clip):
    from sklearn.metrics import silhouette_samples, silhouette_score

    x = _blobs(5, 301, 10, 5, 1.2)
    d = reference_distance(x) if clip else (1.0 - x @ x.T)
    np.fill_diagonal(d, 0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, x.shape[0])
    labels[5] = 9  # a singleton cluster and a gap in the ids
    ours = silhouette(x, torch.from_numpy(labels), metric="dot", clip_distances=clip)
    assert ours == pytest.approx(silhouette_score(d.astype(np.float64), labels, metric="precomputed"), abs=1e-6)
    per = silhouette(x, labels, metric="dot", clip_distances=clip, samples=True).numpy()
    np.testing.assert_allclose(per, silhouette_samples(d.astype(np.float64), labels, metric="precomputed"),
                               atol=2e-6)
    assert per[5] == 0.0


def test_dense_fallback_of_the_clipping_corrections_is_exact():
    x = torch.from_numpy(_blobs(6, 150, 6, 3, 2.0))
    sparse, dense = PairCorrections(x), PairCorrections(x, max_corrections=10)
    assert not sparse.dense and sparse.nnz > 10 and dense.dense
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 4, 150))
    a = silhouette(x, labels, metric="dot", clip_distances=True, _corrections=sparse, _x_ready=True)
    b = silhouette(x, labels, metric="dot", clip_distances=True, _corrections=dense, _x_ready=True)
    assert a == pytest.approx(b, abs=1e-6)  # float32 GEMM of the sums vs dense float64 clipped rows
    fa = kmedoids(x, 4, metric="dot", clip_distances=True, _corrections=sparse, _x_ready=True)
    fb = kmedoids(x, 4, metric="dot", clip_distances=True, _corrections=dense, _x_ready=True)
    assert torch.equal(fa.medoids, fb.medoids) and torch.equal(fa.labels, fb.labels)


def test_sweep_selects_as_the_reference_and_reuses_the_fit():
    x = _blobs(7, 240, 16, 6, 0.6)
    ks = range(4, 10)
    lab, med, kref, scores = reference_cluster(x, ks)
    res = sweep(x, ks, metric="dot", clip_distances=True, keep_fits=True)
    assert res.k == kref and res.note is None
    np.testing.assert_array_equal(res.labels.numpy(), lab)
    np.testing.assert_array_equal(res.medoids.numpy(), med)
    for k in ks:
        assert res.scores[k] == pytest.approx(scores[k], abs=1e-6)
    assert res.labels is res.fits[res.k].labels  # the sweep's own fit, no refit


def test_sweep_rule_strictly_greater_from_zero(monkeypatch):
    import vlmfast.cluster._kmedoids as K

    x = _blobs(8, 60, 4, 3, 0.5)
    seq = iter([0.2, 0.2, 0.5, 0.5, 0.1])
    monkeypatch.setattr(K, "silhouette", lambda *a, **k: next(seq))
    res = K.sweep(x, [2, 3, 4, 5, 6])
    assert res.k == 4 and res.silhouette == 0.5  # first of the equal scores
    seq2 = iter([-0.3, -0.1, -0.2])
    monkeypatch.setattr(K, "silhouette", lambda *a, **k: next(seq2))
    res = K.sweep(x, [2, 3, 4])
    assert res.k == 3 and "no k" in res.note


def test_cosine_metric_normalises_and_device_and_seed():
    x = _blobs(9, 120, 8, 3, 0.4)
    scaled = x * np.random.default_rng(0).uniform(0.5, 3, size=(120, 1)).astype(np.float32)
    a = kmedoids(x, 3, metric="dot")
    b = kmedoids(scaled, 3, metric="cosine")
    assert torch.equal(a.labels, b.labels)
    c = kmedoids(x, 3, metric="dot", seed=5)
    assert c.labels.shape == (120,) and int(c.labels.max()) < 3
    r = kmedoids(x, 3, metric="dot", init="random")
    assert sorted(set(r.medoids.tolist())) == sorted(r.medoids.tolist())


def test_medoids_of_a_given_clustering():
    x = _blobs(10, 90, 5, 3, 0.7)
    labels = np.random.default_rng(2).integers(0, 4, 90)
    labels[labels == 2] = 1  # id 2 empty
    d = reference_distance(x)
    med = medoids_of(x, labels, metric="dot", clip_distances=True).numpy()
    assert med[2] == -1
    for c in (0, 1, 3):
        idx = np.where(labels == c)[0]
        assert med[c] == idx[np.argmin(d[np.ix_(idx, idx)].sum(1))]


def test_bad_input():
    x = _blobs(11, 20, 3, 2, 0.5)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= N = 20, got 21"):
        kmedoids(x, 21)
    with pytest.raises(TypeError, match="k: expected an int"):
        kmedoids(x, 2.0)
    with pytest.raises(ValueError, match="metric"):
        kmedoids(x, 2, metric="l1")
    with pytest.raises(ValueError, match="init"):
        kmedoids(x, 2, init="build")
    with pytest.raises(ValueError, match=r"x: expected shape \(N, d\)"):
        kmedoids(x[0], 2)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        kmedoids(np.ones((4, 2), dtype=np.int64), 2)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="x: contains NaN"):
        kmedoids(bad, 2)
    with pytest.raises(ValueError, match="labels: the silhouette needs 2"):
        silhouette(x, np.zeros(20, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels: expected an integer tensor of shape \(20,\)"):
        silhouette(x, np.zeros(19, dtype=np.int64))
    with pytest.raises(ValueError, match="ks: every k must be in 2..N-1"):
        sweep(x, [1, 2])
    with pytest.raises(ValueError, match="ks: expected at least one"):
        sweep(x, [])


def test_duplicates_and_large_k_do_not_break():
    """Exact duplicate points (identical region embeddings, e.g. the same planted square) tie everywhere."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 6))
    x = np.repeat(base, 8, axis=0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    d = reference_distance(x)
    ref = reference_kmedoids_class()(n_clusters=7, random_state=0, metric="precomputed", init="k-medoids++").fit(d)
    ours = kmedoids(x, 7, metric="dot", clip_distances=True)
    np.testing.assert_array_equal(ours.labels.numpy(), ref.labels_)
    s = silhouette(x, ours.labels, metric="dot", clip_distances=True)
    assert math.isfinite(s)
