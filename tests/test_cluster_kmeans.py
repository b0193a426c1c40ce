"""vlmfast.cluster.kmeans: the FAISS and vlmfast backends agree on seeded blobs (objective within 1%), results are
well-formed, FAISS trains on every point (no silent subsampling), empty clusters are re-seeded deterministically,
and bad arguments raise naming the argument."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmfast.cluster._kmeans as km
from vlmfast.cluster import KMeansResult, kmeans

faiss = pytest.importorskip("faiss")


def _blobs(N=3000, k=12, d=16, spread=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * spread
    y = torch.randint(0, k, (N,), generator=g)
    return centers[y] + torch.randn(N, d, generator=g), y


def _np_objective(x, centroids, labels, spherical):
    X = x.double().numpy()
    C = centroids.double().numpy()
    lab = labels.numpy()
    if spherical:
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        return float((1.0 - (X * C[lab]).sum(1)).sum())
    return float(((X - C[lab]) ** 2).sum())


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_backends_reach_the_same_objective_on_blobs(spherical, init):
    x, _ = _blobs()
    res = {b: kmeans(x, 12, spherical=spherical, niter=20, seed=3, init=init, backend=b) for b in ("faiss", "vlmfast")}
    for b, r in res.items():
        assert isinstance(r, KMeansResult) and r.backend == b and r.n_iter == 20
        assert r.centroids.shape == (12, 16) and r.centroids.dtype == torch.float32
        assert r.labels.shape == (3000,) and r.labels.dtype == torch.int64
        assert int(r.labels.min()) >= 0 and int(r.labels.max()) < 12
        # the reported objective is the one of the returned labels and centroids (float64)
        assert math.isclose(r.objective, _np_objective(x, r.centroids, r.labels, spherical), rel_tol=1e-4)
        if spherical:
            torch.testing.assert_close(r.centroids.norm(dim=1), torch.ones(12))
    a, b = res["faiss"].objective, res["vlmfast"].objective
    assert abs(a - b) <= 0.01 * max(a, b), (a, b)


def test_auto_picks_faiss_and_tol_stops_early():
    x, _ = _blobs(N=1500, k=6)
    assert kmeans(x, 6, niter=3).backend == "faiss"
    early = kmeans(x, 6, niter=50, tol=1e-4, backend="vlmfast")
    assert early.n_iter < 50
    assert kmeans(x, 6, niter=3, tol=1e-4).backend == "vlmfast"  # auto: FAISS has no early stopping


def test_faiss_trains_on_every_point():
    # N / k = 1500 points per centroid, far above FAISS's default max_points_per_centroid = 256: a silent
    # subsample would move the centroids after one iteration by ~ noise / sqrt(256).
    x, _ = _blobs(N=3000, k=2, d=8, spread=1.0, seed=1)
    seen = {}
    real = faiss.Kmeans

    class Spy(real):
        def __init__(self, d, k, **kw):
            seen.update(kw)
            super().__init__(d, k, **kw)

    try:
        faiss.Kmeans = Spy
        f = kmeans(x, 2, spherical=False, niter=1, init="random", seed=5, backend="faiss")
    finally:
        faiss.Kmeans = real
    assert seen["max_points_per_centroid"] >= math.ceil(3000 / 2)
    # One Lloyd iteration from the same start, on every point: the means of the full assignment.
    gen = torch.Generator().manual_seed(5)
    c0 = km._init_centroids(x, 2, "random", gen)
    lab = torch.cdist(x, c0).argmin(1)
    full = torch.stack([x[lab == j].mean(0) for j in range(2)])
    torch.testing.assert_close(f.centroids, full, atol=1e-4, rtol=1e-4)
    v = kmeans(x, 2, spherical=False, niter=1, init="random", seed=5, backend="vlmfast")
    torch.testing.assert_close(v.centroids, full, atol=1e-4, rtol=1e-4)
    # control: FAISS left to its defaults subsamples, and its centroids then differ visibly
    sub = faiss.Kmeans(8, 2, niter=1, seed=5, verbose=False)
    sub.train(x.numpy(), init_centroids=c0.numpy())
    assert float((torch.from_numpy(sub.centroids) - full).abs().max()) > 1e-3


def test_max_points_per_centroid_subsamples_both_backends_alike():
    x, _ = _blobs(N=2000, k=4, d=8)
    res = [kmeans(x, 4, niter=5, spherical=False, max_points_per_centroid=50, backend=b) for b in ("faiss", "vlmfast")]
    for r in res:
        assert r.labels.shape == (2000,)
    torch.testing.assert_close(res[0].centroids, res[1].centroids, atol=1e-4, rtol=1e-4)


def test_empty_clusters_are_reseeded_at_the_farthest_points():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 0.0], [0.0, 7.0]])
    c0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # copies 1 and 2 get no point
    c, n = km._lloyd(x, c0, 1, spherical=False, tol=0.0)
    assert n == 1
    # the two farthest points from centroid 0: (10, 0) first, then (0, 7); they leave cluster 0
    torch.testing.assert_close(c, torch.tensor([[0.1 / 3, 0.1 / 3], [10.0, 0.0], [0.0, 7.0]]))
    r = kmeans(x, 3, spherical=False, niter=3, backend="vlmfast", init="random")
    assert sorted(r.labels.bincount(minlength=3).tolist()) == [1, 1, 3]
    # spherical: the least similar points re-seed
    xs = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    c, _ = km._lloyd(xs, xs[[0, 0, 0]], 1, spherical=True, tol=0.0)
    assert torch.allclose(c[1], xs[3]) and torch.allclose(c[2], xs[2])


def test_inputs_accepted():
    x, _ = _blobs(N=400, k=3, d=5)
    r64 = kmeans(x.double(), 3, niter=4, backend="vlmfast")
    rnp = kmeans(x.numpy(), 3, niter=4, backend="vlmfast")
    assert torch.equal(r64.labels, rnp.labels)
    rbf = kmeans(x.bfloat16(), 3, niter=4, spherical=False, backend="vlmfast")
    assert rbf.labels.shape == (400,)
    one = kmeans(x, 1, niter=2, spherical=False, backend="vlmfast")
    torch.testing.assert_close(one.centroids[0], x.mean(0), atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    x, _ = _blobs(N=50, k=3, d=4)
    cases = [
        (dict(k=0), ValueError, r"k: expected an int >= 1, got 0"),
        (dict(k=51), ValueError, r"k: expected 1 <= k <= N = 50"),
        (dict(k=2.0), TypeError, r"k: expected an int"),
        (dict(niter=0), ValueError, r"niter: expected an int >= 1"),
        (dict(init="kmeans"), ValueError, r"init: expected 'k-means\+\+' or 'random', got 'kmeans'"),
        (dict(backend="sklearn"), ValueError, r"backend: expected 'auto', 'faiss' or 'vlmfast'"),
        (dict(spherical="yes"), TypeError, r"spherical: expected a bool"),
        (dict(max_points_per_centroid=0), ValueError, r"max_points_per_centroid: expected an int >= 1"),
        (dict(tol=-1.0), ValueError, r"tol: expected a float >= 0"),
        (dict(tol=0.1, backend="faiss"), ValueError, r"tol: FAISS has no early stopping"),
    ]
    for kw, exc, msg in cases:
        kw = {"k": 3, **kw}
        with pytest.raises(exc, match=msg):
            kmeans(x, kw.pop("k"), **kw)
    with pytest.raises(TypeError, match="x: expected float32, float16, bfloat16 or float64, got torch.int64"):
        kmeans(x.long(), 3)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, d\), got \(50,\)"):
        kmeans(x[:, 0], 3)
    bad = x.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite values, got a NaN or inf in row 7"):
        kmeans(bad, 3)


@pytest.mark.cuda
def test_vlmfast_backend_on_cuda():
    x, _ = _blobs()
    cpu = kmeans(x, 12, niter=10, seed=3, backend="vlmfast")
    gpu = kmeans(x.cuda(), 12, niter=10, seed=3, backend="vlmfast")
    assert gpu.labels.device.type == "cuda"
    assert abs(cpu.objective - gpu.objective) <= 0.01 * cpu.objective
