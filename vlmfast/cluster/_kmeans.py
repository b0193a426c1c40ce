"""k-means (Lloyd) on a device with :func:`vlmfast.ops.kmeans_assign.kmeans_assign`, or FAISS's ``faiss.Kmeans``,
behind one function with one initialisation and one objective, so the two backends are interchangeable.

:func:`kmeans` ``(x, k)``:

* **Data.** ``x (N, d)``: a tensor (or array-like), float32/float16/bfloat16/float64, finite, ``1 <= k <= N``.
  ``spherical=True`` (the default, for embeddings): the rows are L2-normalised first, the assignment is by largest
  inner product (metric ``"ip"``) and the centroids are L2-normalised after every update (spherical k-means);
  ``spherical=False``: squared Euclidean distance (metric ``"l2"``), centroids are the plain means.
* **Training set.** ``max_points_per_centroid=None`` (default): every point trains. An int ``m``: a seeded random
  subset of ``min(N, m k)`` points trains (as FAISS would do by itself), for both backends alike; the labels and
  the objective are always those of all N points. FAISS is always given ``max_points_per_centroid >= ceil(n_train
  / k)``, so it never subsamples silently on its own.
* **Initialisation** (the same for both backends, computed here, then given to FAISS as ``init_centroids``):
  ``"k-means++"`` — the first centroid a uniformly drawn training point, each next one drawn with probability
  proportional to the squared distance to the nearest centroid so far (D^2 sampling; uniforms from a CPU
  ``torch.Generator(seed)``, so the draw does not depend on the device's RNG); ``"random"`` — ``k`` distinct
  training points drawn uniformly. Exactly duplicated points can make two initial centroids equal; the empty
  cluster that results is re-seeded like any other.
* **Iterations.** ``niter`` Lloyd iterations (assign every training point, then move every centroid to the mean
  of its points), as ``faiss.Kmeans(niter=...)``. ``tol > 0`` (vlmfast backend only): stop early once an
  iteration improves the objective of the training set by at most ``tol`` times its previous value.
* **Empty clusters** (vlmfast backend): after an assignment, the ``e`` clusters that received no point, in index
  order, are re-seeded at the ``e`` training points farthest from their centroid (largest squared distance, or
  smallest inner product for spherical), ties to the lower point index; each such point is moved out of the sum
  of the cluster it was assigned to. Deterministic. (FAISS instead splits a large cluster in two by perturbing
  its centroid.)
* **Result** :class:`KMeansResult`: ``centroids (k, d)`` float32 on x's device, ``labels (N,)`` int64 (the final
  assignment of all points to the final centroids, by ``kmeans_assign`` for both backends), ``objective`` — the
  sum over all points of the squared distance to their centroid (l2) or of ``1 - cos`` (spherical), in float64,
  computed the same way for both backends — the number of iterations run, and the backend (``"faiss"`` or
  ``"vlmfast"``).
* **Backend.** ``"faiss"``: ``faiss.Kmeans`` (``gpu=True`` when ``faiss.get_num_gpus() > 0``) on a host float32
  numpy copy of the training set; ``"vlmfast"``: Lloyd on x's device with :func:`kmeans_assign` (its own
  dispatch: cpp/torch on CPU, triton on CUDA; ``VLMFAST_BACKEND`` applies); ``"auto"``: FAISS when it imports and
  ``tol == 0``, else vlmfast.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfast._optional import require
from vlmfast.ops.kmeans_assign import kmeans_assign

BACKENDS = ("auto", "faiss", "vlmfast")
INITS = ("k-means++", "random")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class KMeansResult(NamedTuple):
    """What :func:`kmeans` returns (module docs)."""

    centroids: Tensor  # (k, d) float32, on x's device
    labels: Tensor  # (N,) int64
    objective: float  # sum of squared distances (l2) or of 1 - cos (spherical), over all N points
    n_iter: int
    backend: str  # "faiss" or "vlmfast"


def _faiss_or_none():
    try:
        import faiss  # noqa: F401
    except Exception:
        return None
    return faiss


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} ({v!r})")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def _check_args(x: Any, k: Any, spherical: Any, niter: Any, seed: Any, init: Any, backend: Any,
                max_points_per_centroid: Any, tol: Any) -> tuple[Tensor, int, int | None, float, str]:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:
            raise TypeError(f"x: expected a tensor or array-like, got {type(x).__name__} ({exc})") from None
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected shape (N, d), got {tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError("x: expected a tensor with data (CPU or CUDA), got a meta tensor")
    N, d = x.shape
    if d < 1:
        raise ValueError(f"x: expected d >= 1 features, got shape {tuple(x.shape)}")
    k = _check_int(k, "k", 1)
    if k > N:
        raise ValueError(f"k: expected 1 <= k <= N = {N} (the number of points), got {k}")
    if not isinstance(spherical, bool):
        raise TypeError(f"spherical: expected a bool, got {type(spherical).__name__}")
    _check_int(niter, "niter", 1)
    _check_int(seed, "seed", 0)
    if init not in INITS:
        raise ValueError(f"init: expected 'k-means++' or 'random', got {init!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto', 'faiss' or 'vlmfast', got {backend!r}")
    if max_points_per_centroid is not None:
        max_points_per_centroid = _check_int(max_points_per_centroid, "max_points_per_centroid", 1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0.0:
        raise ValueError(f"tol: expected a float >= 0, got {tol!r}")
    if backend == "faiss" and tol > 0:
        raise ValueError(f"tol: FAISS has no early stopping; expected tol = 0 with backend='faiss', got {tol}")
    if not bool(torch.isfinite(x).all()):  # one host sync; NaN/inf points have no meaningful cluster
        bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"x: expected finite values, got a NaN or inf in row {bad}")
    if backend == "auto":
        backend = "faiss" if (_faiss_or_none() is not None and tol == 0) else "vlmfast"
    return x, k, max_points_per_centroid, float(tol), backend


# ----------------------------------------------------------------------------------------------------------
# Shared pieces: data preparation, initialisation, objective
# ----------------------------------------------------------------------------------------------------------


def _prepare(x: Tensor, spherical: bool) -> Tensor:
    """The points as clustered: float32 (float64 is rounded; float16/bfloat16 stay, kmeans_assign upcasts),
    L2-normalised rows (float32) for spherical k-means."""
    if spherical:
        return F.normalize(x.float(), dim=1)
    return x.float() if x.dtype == torch.float64 else x


def _training_set(x: Tensor, k: int, mppc: int | None, gen: torch.Generator) -> Tensor:
    N = x.shape[0]
    if mppc is None or mppc * k >= N:
        return x
    idx = torch.randperm(N, generator=gen)[: mppc * k].sort().values
    return x[idx.to(x.device)]


def _init_centroids(x: Tensor, k: int, init: str, gen: torch.Generator) -> Tensor:
    """``(k, d)`` float32 initial centroids (module docs), drawn with the CPU generator ``gen``."""
    N = x.shape[0]
    if init == "random":
        idx = torch.randperm(N, generator=gen)[:k]
        return x[idx.to(x.device)].float()
    xf = x.float()
    xx = (xf * xf).sum(dim=1)

    def sqdist(i: int) -> Tensor:  # squared distances to point i, expanded (one matrix-vector product), float64
        ci = xf[i]
        return (xx - 2.0 * (xf @ ci) + xx[i]).clamp_min_(0.0).double()

    first = int(torch.randint(N, (1,), generator=gen))
    chosen = [first]
    d2 = sqdist(first)
    d2[first] = 0.0
    for _ in range(1, k):
        cum = torch.cumsum(d2, dim=0)
        total = float(cum[-1])
        if total > 0.0:
            u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
            i = int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device), right=True)[0])
            i = min(i, N - 1)
        else:  # every point sits on a centroid already: any point
            i = int(torch.randint(N, (1,), generator=gen))
        chosen.append(i)
        d2 = torch.minimum(d2, sqdist(i))
        d2[i] = 0.0
    centroids = xf[torch.tensor(chosen, device=x.device)]
    return centroids


def _objective(scores: Tensor, spherical: bool) -> float:
    """Sum of squared distances (l2 scores) or of 1 - cos (spherical: ip scores of unit vectors), float64."""
    s = scores.double()
    return float((1.0 - s).sum()) if spherical else float(s.sum())


# ----------------------------------------------------------------------------------------------------------
# Backends: (x_train, initial centroids) -> (final centroids, iterations run)
# ----------------------------------------------------------------------------------------------------------


def _lloyd(xt: Tensor, c: Tensor, niter: int, spherical: bool, tol: float) -> tuple[Tensor, int]:
    metric = "ip" if spherical else "l2"
    k = c.shape[0]
    prev = None
    it = 0
    for it in range(1, niter + 1):
        a = kmeans_assign(xt, c, metric=metric)
        sums, counts = a.sums, a.counts
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # Re-seed at the farthest points (largest distance / smallest similarity), ties to the lower index.
            far = torch.sort(a.scores, descending=not spherical, stable=True).indices[: empty.numel()]
            sums = sums.clone()
            counts = counts.clone()
            pts = xt[far].float()
            src = a.labels[far]
            sums.index_add_(0, src, -pts)
            counts.index_add_(0, src, -torch.ones_like(src))
            sums[empty] = pts
            counts[empty] = 1
        new = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        # A cluster emptied by the re-seeding keeps its previous centroid.
        new = torch.where((counts > 0).unsqueeze(1), new, c)
        if spherical:
            new = F.normalize(new, dim=1)
        c = new
        if tol > 0:
            obj = _objective(a.scores, spherical)
            if prev is not None and prev - obj <= tol * abs(prev):
                break
            prev = obj
    return c, it


def _faiss(xt: Tensor, c0: Tensor, niter: int, spherical: bool, seed: int) -> tuple[Tensor, int]:
    faiss = require("faiss", "vlmfast.cluster.kmeans(backend='faiss')")
    n, d = xt.shape
    k = c0.shape[0]
    xn = xt.detach().to("cpu", torch.float32).contiguous().numpy()
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                      gpu=faiss.get_num_gpus() > 0,
                      max_points_per_centroid=max(1, math.ceil(n / k)),  # >= n / k: FAISS never subsamples
                      min_points_per_centroid=1)  # no "please provide at least ..." warning
    km.train(xn, init_centroids=c0.detach().to("cpu", torch.float32).contiguous().numpy())
    return torch.from_numpy(km.centroids.copy()).to(xt.device), niter


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def kmeans(
    x: Tensor,
    k: int,
    *,
    spherical: bool = True,
    niter: int = 25,
    seed: int = 0,
    init: str = "k-means++",
    backend: str = "auto",
    max_points_per_centroid: int | None = None,
    tol: float = 0.0,
) -> KMeansResult:
    """k-means of the rows of ``x`` into ``k`` clusters (module docs: data, initialisation, iterations, empty
    clusters, objective, backends).

    Args:
        x: ``(N, d)`` finite points (tensor or array-like; float32/float16/bfloat16/float64), CPU or CUDA.
        k: number of clusters, ``1 <= k <= N``.
        spherical: cluster directions (normalised rows, inner product, normalised centroids); else squared L2.
        niter: Lloyd iterations (>= 1).
        seed: seeds the initialisation (and the training subset).
        init: ``"k-means++"`` or ``"random"``.
        backend: ``"auto"`` (FAISS when importable and ``tol == 0``), ``"faiss"`` or ``"vlmfast"``.
        max_points_per_centroid: None (train on every point) or train on a seeded subset of ``min(N, m k)``.
        tol: relative improvement of the objective below which the vlmfast iterations stop (0: run all).
    """
    x, k, mppc, tol, backend = _check_args(x, k, spherical, niter, seed, init, backend, max_points_per_centroid,
                                           tol)
    gen = torch.Generator().manual_seed(seed)
    xp = _prepare(x, spherical)
    xt = _training_set(xp, k, mppc, gen)
    c0 = _init_centroids(xt, k, init, gen)
    if backend == "faiss":
        centroids, n_iter = _faiss(xt, c0, niter, spherical, seed)
    else:
        centroids, n_iter = _lloyd(xt, c0, niter, spherical, tol)
    centroids = centroids.float().contiguous()
    final = kmeans_assign(xp, centroids, metric="ip" if spherical else "l2")
    return KMeansResult(centroids, final.labels, _objective(final.scores, spherical), n_iter, backend)


__all__ = ["KMeansResult", "kmeans"]
