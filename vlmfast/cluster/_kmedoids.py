"""Exact cosine k-medoids, silhouette and the RaVL k sweep, without an N x N distance matrix.

The RaVL discovery step (``ravl/discover.py::cluster``) builds the dense matrix ``D = clip(1 - E E^T, 0, 1)``
(zero diagonal), fits scikit-learn-extra ``KMedoids(k, metric="precomputed", init="k-medoids++",
random_state=0)`` (method ``"alternate"``, ``max_iter=300``) for every k in ``range(2C, 5C)`` and keeps the k
with the best ``sklearn.metrics.silhouette_score``. The matrix needs 4 N^2 bytes: 40 GB at 100k regions. For
the distance ``1 - x.y`` everything those algorithms need comes from **cluster sums** ``S_c = sum_{j in c} x_j``:

* the cost of candidate medoid i of cluster c, ``sum_{j in c, j != i} (1 - x_i.x_j) = (n_c - 1) - x_i.(S_c - x_i)``,
  so the medoid is the argmax of ``x_i.S_c`` (self-term corrected);
* the mean distance from x_i to cluster c (silhouette a(i), b(i)): ``1 - x_i.S_c / n_c`` (own cluster with the
  self-term removed, divided by ``n_c - 1``);
* assignment and k-medoids++ seeding need one row of distances per medoid / candidate.

So a fit costs O(N k d) per iteration and O(N d) memory, on any device.

**Parity with the reference's clipping** (``clip_distances=True``): the reference clips distances to [0, 1],
i.e. similarities to [0, 1]. Assignment and seeding clip their rows directly. Sums over clusters are corrected
exactly: one chunked pass over all pairs finds the pairs with a negative similarity (for CLIP-like embeddings
few or none) and stores ``clip(s, 0, 1) - s = -s`` for them (a sparse N x N correction, off the diagonal);
sums over a cluster then add the corrections of its members. Similarities above 1 arise only from rounding for
unit vectors (the reference's own float32 ``1 - s`` rounds the same way) and are not corrected. When the
negative pairs exceed ``max_corrections`` the sums fall back to dense chunked passes (O(N^2 d), exact).
``clip_distances=False`` (default of :func:`kmedoids`) uses the plain distance 1 - x.y.

**Semantics kept from the reference implementation** (scikit-learn-extra 0.3.0 ``KMedoids``):

* k-medoids++ seeding with ``numpy.random.RandomState(seed)``: first medoid ``randint(N)``; then
  ``2 + int(log k)`` candidates per step drawn by ``searchsorted(cumsum(d^2), u * potential)``; the candidate
  with the lowest potential (strictly lower wins; first on ties) is kept;
* "alternate" iterations: labels = argmin distance to the medoids (first medoid on ties, a medoid's distance to
  itself is 0); each non-empty cluster moves its medoid to the member of lowest cost (first in index order on
  ties) only when that cost is strictly lower than the current medoid's (if the current medoid is not a member,
  the first member's cost stands in, as the reference's ``argmax`` does); an empty cluster keeps its medoid;
  stop when no medoid moves or after ``max_iter`` iterations; final labels from the final medoids;
* silhouette as scikit-learn's: ``(b - a) / max(a, b)``, 0 for members of singleton clusters and for
  ``a = b = 0``; the mean over all points; b over the non-empty other clusters.

The same seeds therefore give the reference's medoids up to floating-point rounding of the distances (the
reference sums float32 rows; near-ties can break differently).

``metric``: ``"cosine"`` normalises the rows first; ``"dot"`` uses ``1 - x.y`` on the rows as given, as the
reference does with its (already normalised) embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["KMedoidsResult", "SweepResult", "kmedoids", "silhouette", "sweep", "medoids_of", "PairCorrections"]

_METRICS = ("cosine", "dot")
_INITS = ("k-medoids++", "random")


# ----------------------------------------------------------------------------------------------------- inputs

def _as_points(x: Any, metric: str, device: Any = None) -> torch.Tensor:
    if metric not in _METRICS:
        raise ValueError(f"metric: expected one of {_METRICS}, got {metric!r}")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a (N, d) torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (N, d), got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"x: expected a floating-point dtype, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x: expected at least one point and one dimension, got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    x = x.float() if x.dtype != torch.float64 else x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or inf")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x.contiguous()


def _check_k(k: Any, n: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"{name}: expected 1 <= {name} <= N = {n}, got {k}")
    return k


def _chunk_rows(n: int, other: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so that a chunk x ``other`` float32 block stays near ``budget`` elements."""
    return max(1, min(n, budget // max(1, other)))


# ---------------------------------------------------------------------------------------- clipping corrections

class PairCorrections:
    """Exact corrections that turn cluster sums of similarities ``s`` into sums of ``clip(s, 0, 1)``.

    Holds the off-diagonal pairs (i, j) with ``s_ij < 0`` and their correction ``-s_ij`` (COO, rows sorted), or
    ``dense=True`` when there were more than ``max_corrections`` of them (callers then sum clipped rows in
    chunks). Built once per point set and shared by every fit of a sweep."""

    def __init__(self, x: torch.Tensor, max_corrections: int = 1 << 26):
        n = x.shape[0]
        rows, cols, vals = [], [], []
        total = 0
        self.dense = False
        step = _chunk_rows(n, n)
        for lo in range(0, n, step):
            s = x[lo:lo + step] @ x.T
            neg = s < 0
            idx = torch.arange(lo, min(n, lo + step), device=x.device)
            neg[idx - lo, idx] = False
            r, c = neg.nonzero(as_tuple=True)
            total += r.numel()
            if total > max_corrections:
                self.dense = True
                rows, cols, vals = [], [], []
                break
            rows.append(r + lo)
            cols.append(c)
            vals.append(-s[r, c])
        self.n = n
        if self.dense:
            self.rows = self.cols = self.vals = None
            self.nnz = total
        else:
            self.rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=x.device)
            self.cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long, device=x.device)
            self.vals = (torch.cat(vals) if vals else torch.zeros(0, device=x.device)).double()
            self.nnz = int(self.rows.numel())

    def per_cluster(self, labels: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) float64: for each point i and cluster c, the sum of corrections over members j of c."""
        out = torch.zeros(self.n, k, dtype=torch.float64, device=labels.device)
        if self.nnz:
            out.index_put_((self.rows, labels[self.cols]), self.vals, accumulate=True)
        return out

    def own_cluster(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) float64: the sum of corrections over the members of each point's own cluster."""
        out = torch.zeros(self.n, dtype=torch.float64, device=labels.device)
        if self.nnz:
            same = labels[self.rows] == labels[self.cols]
            out.index_add_(0, self.rows[same], self.vals[same])
        return out


def _dense_clipped_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) float64: sum over members j != i of clip(x_i.x_j, 0, 1), by chunked dense passes."""
    n = x.shape[0]
    out = torch.zeros(n, k, dtype=torch.float64, device=x.device)
    step = _chunk_rows(n, n)
    for lo in range(0, n, step):
        s = (x[lo:lo + step] @ x.T).clamp_(0, 1)
        idx = torch.arange(lo, min(n, lo + step), device=x.device)
        s[idx - lo, idx] = 0
        out[lo:lo + step].index_add_(1, labels, s.double())
    return out


# ---------------------------------------------------------------------------------------------- core pieces

def _similarity_sums(x: torch.Tensor, labels: torch.Tensor, k: int, clip: bool,
                     corr: PairCorrections | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, counts): T (N, k) float64 = sum over members j of cluster c, j != i, of s_ij (clipped if ``clip``);
    counts (k,) int64."""
    counts = torch.bincount(labels, minlength=k)
    if clip and corr is not None and corr.dense:
        return _dense_clipped_sums(x, labels, k), counts
    n = x.shape[0]
    s32 = _cluster_sums64(x, labels, k).float()
    t = torch.empty(n, k, dtype=torch.float64, device=x.device)
    step = _chunk_rows(n, k)
    for lo in range(0, n, step):
        xc = x[lo:lo + step].float()
        t[lo:lo + step] = (xc @ s32.T).double()
    own = (x.float() * x.float()).sum(1).double()
    t.scatter_add_(1, labels[:, None], -own[:, None])
    if clip and corr is not None:
        t += corr.per_cluster(labels, k)
    return t, counts


def _distance_rows(x: torch.Tensor, idx: torch.Tensor, clip: bool) -> torch.Tensor:
    """Distances (len(idx), N) from the points ``idx`` to all points, float32, 0 on their own column."""
    d = 1.0 - x[idx] @ x.T
    if clip:
        d.clamp_(0, 1)
    d[torch.arange(idx.numel(), device=x.device), idx] = 0
    return d


def _assign(x: torch.Tensor, medoids: torch.Tensor, clip: bool) -> torch.Tensor:
    """labels (N,) = argmin over medoids of the distance (first medoid on ties; a medoid is at 0 from itself)."""
    n = x.shape[0]
    k = medoids.numel()
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    m = x[medoids]
    step = _chunk_rows(n, k)
    for lo in range(0, n, step):
        d = 1.0 - x[lo:lo + step] @ m.T
        if clip:
            d.clamp_(0, 1)
        hit = (medoids >= lo) & (medoids < lo + step)
        if bool(hit.any()):
            j = hit.nonzero(as_tuple=True)[0]
            d[medoids[j] - lo, j] = 0
        labels[lo:lo + step] = d.argmin(1)  # torch.argmin returns the first minimal index
    return labels


class _SeedCache:
    """k-medoids++ prefixes shared by the fits of a sweep: with the same seed and the same number of trials per
    step (``2 + int(log k)``), the seeding for k is the first k centres of the seeding for any larger k (the
    random stream is consumed identically), so a sweep seeds once per trial count and extends as needed."""

    def __init__(self):
        self.state: dict[tuple[int, int, bool], dict[str, Any]] = {}


def _kpp_init(x: torch.Tensor, k: int, seed: int, clip: bool, cache: _SeedCache | None = None) -> torch.Tensor:
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    key = (seed, trials, clip)
    st = cache.state.get(key) if cache is not None else None
    if st is None:
        rng = np.random.RandomState(seed)
        first = int(rng.randint(n))
        closest = _distance_rows(x, torch.tensor([first], device=x.device), clip)[0] ** 2
        st = {"rng": rng, "centers": [first], "closest": closest, "pot": float(closest.sum())}
        if cache is not None:
            cache.state[key] = st
    rng, centers = st["rng"], st["centers"]
    closest, pot = st["closest"], st["pot"]
    while len(centers) < k:
        u = rng.random_sample(trials) * pot
        cum = torch.cumsum(closest.double(), 0)
        cand = torch.searchsorted(cum, torch.from_numpy(u).to(cum.device)).clamp_(max=n - 1)
        dist = _distance_rows(x, cand, clip) ** 2
        new = torch.minimum(closest[None, :], dist)
        pots = new.sum(1).tolist()
        best = 0
        for t in range(1, trials):
            if pots[t] < pots[best]:
                best = t
        centers.append(int(cand[best]))
        pot = pots[best]
        closest = new[best]
    st["closest"], st["pot"] = closest, pot
    return torch.tensor(centers[:k], dtype=torch.long, device=x.device)


def _cluster_sums64(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, d) float64 sums of the members of each cluster, from float64 copies of bounded row chunks."""
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    step = _chunk_rows(n, d, 1 << 22)
    for lo in range(0, n, step):
        sums.index_add_(0, labels[lo:lo + step], x[lo:lo + step].double())
    return sums


def _exact_costs(x, idx, labels, sums, counts, clip, corr_own):
    """float64 cost of the points ``idx`` as medoids of their own cluster."""
    xi = x[idx].double()
    li = labels[idx]
    t = (xi * sums[li]).sum(1) - (xi * xi).sum(1)
    if corr_own is not None:
        t = t + corr_own[idx]
    return (counts[li] - 1).double() - t


def _member_costs(x: torch.Tensor, labels: torch.Tensor, k: int, clip: bool, corr: PairCorrections | None,
                  keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cost, counts): cost (N,) float64 = sum over the other members j of i's cluster of the distance.

    Costs come from one float32 GEMM against the float64 cluster sums; every point whose float32 cost is
    within the float32 error bound of its cluster's best (and the points in ``keep``, e.g. the current
    medoids) is then recomputed in float64, so argmin decisions are those of the float64 costs. Points outside
    that band get their float32 estimate (they cannot be a cluster's minimum)."""
    n, d = x.shape
    counts = torch.bincount(labels, minlength=k)
    if clip and corr is not None and corr.dense:
        t = _dense_clipped_sums(x, labels, k).gather(1, labels[:, None])[:, 0]
        return (counts[labels] - 1).double() - t, counts
    sums = _cluster_sums64(x, labels, k)
    corr_own = corr.own_cluster(labels) if (clip and corr is not None) else None
    t32 = torch.empty(n, dtype=torch.float64, device=x.device)
    s32 = sums.float()
    step = _chunk_rows(n, k)
    for lo in range(0, n, step):
        xc = x[lo:lo + step].float()
        t32[lo:lo + step] = ((xc @ s32.T).gather(1, labels[lo:lo + step, None])[:, 0]
                             - (xc * xc).sum(1)).double()
    if corr_own is not None:
        t32 += corr_own
    cost = (counts[labels] - 1).double() - t32
    # float32 error bound of x_i . S_c (d products of magnitude <= |S_c| <= n_c, S_c rounded to float32)
    tol = (2 * (d + 4) * 2.0 ** -24) * (counts.double() + 1)
    best = torch.full((k,), float("inf"), dtype=torch.float64, device=x.device).scatter_reduce_(
        0, labels, cost, reduce="amin")
    near = cost <= best[labels] + 2 * tol[labels]
    if keep is not None:
        near[keep.clamp(0, n - 1)] = True
    idx = near.nonzero(as_tuple=True)[0]
    cost[idx] = _exact_costs(x, idx, labels, sums, counts, clip, corr_own)
    return cost, counts


def _best_members(cost: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, cost) of each cluster's lowest-cost member, first index on ties (n / inf for empty ids)."""
    n = cost.numel()
    best_cost = torch.full((k,), float("inf"), dtype=cost.dtype, device=cost.device).scatter_reduce_(
        0, labels, cost, reduce="amin")
    idx = torch.arange(n, device=cost.device)
    cand = torch.where(cost == best_cost[labels], idx, torch.full_like(idx, n))
    best = torch.full((k,), n, dtype=torch.long, device=cost.device).scatter_reduce_(0, labels, cand, reduce="amin")
    return best, best_cost


def _update_medoids(x: torch.Tensor, labels: torch.Tensor, medoids: torch.Tensor, clip: bool,
                    corr: PairCorrections | None) -> torch.Tensor:
    """One 'alternate' medoid update (returns new medoid indices)."""
    n = x.shape[0]
    k = medoids.numel()
    idx = torch.arange(n, device=x.device)
    first = torch.full((k,), n, dtype=torch.long, device=x.device).scatter_reduce_(0, labels, idx, reduce="amin")
    cost, counts = _member_costs(x, labels, k, clip, corr, keep=torch.cat([medoids, first]))
    best_idx, best_cost = _best_members(cost, labels, k)
    member = labels[medoids] == torch.arange(k, device=x.device)
    cur = torch.where(member, medoids, first).clamp(max=n - 1)
    nonempty = counts > 0
    cur_cost = torch.where(nonempty, cost[cur], torch.full_like(best_cost, float("inf")))
    move = nonempty & (best_cost < cur_cost)
    return torch.where(move, best_idx, medoids)


def _inertia(x: torch.Tensor, labels: torch.Tensor, medoids: torch.Tensor, clip: bool) -> float:
    s = (x * x[medoids][labels]).sum(1)
    d = 1.0 - s
    if clip:
        d = d.clamp(0, 1)
    d = torch.where(medoids[labels] == torch.arange(x.shape[0], device=x.device), torch.zeros_like(d), d)
    return float(d.double().sum())


# ---------------------------------------------------------------------------------------------- public API

@dataclass
class KMedoidsResult:
    """``labels`` (N,) int64, ``medoids`` (k,) int64 point indices, ``inertia`` = sum of distances to the own
    medoid, ``n_iter`` iterations run, ``converged`` (no medoid moved in the last one)."""

    labels: torch.Tensor
    medoids: torch.Tensor
    inertia: float
    n_iter: int
    converged: bool
    k: int = 0


def kmedoids(x: Any, k: int, *, metric: str = "cosine", init: str = "k-medoids++", seed: int = 0,
             max_iter: int = 300, clip_distances: bool = False, device: Any = None,
             _corrections: PairCorrections | None = None, _x_ready: bool = False,
             _seeds: _SeedCache | None = None) -> KMedoidsResult:
    """Exact k-medoids for the cosine distance ``1 - x.y`` (scikit-learn-extra's "alternate" method and
    k-medoids++ seeding, see the module docstring), matrix-free: O(N k d) per iteration, O(N d) memory.

    ``x``: (N, d) float tensor or array (any device; ``device=`` moves it). ``k``: 1..N. ``metric``: ``"cosine"``
    (rows normalised) or ``"dot"`` (rows as given). ``init``: ``"k-medoids++"`` or ``"random"`` (k distinct
    points from ``RandomState(seed).choice``). ``clip_distances``: reproduce the reference's clipping of
    distances to [0, 1]."""
    x = x if _x_ready else _as_points(x, metric, device)
    n = x.shape[0]
    k = _check_k(k, n)
    if init not in _INITS:
        raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter: expected an int >= 0, got {max_iter!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    corr = _corrections
    if clip_distances and corr is None:
        corr = PairCorrections(x)
    if init == "k-medoids++":
        medoids = _kpp_init(x, k, int(seed), clip_distances, _seeds)
    else:
        medoids = torch.from_numpy(np.random.RandomState(int(seed)).choice(n, k, replace=False)).to(x.device)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        labels = _assign(x, medoids, clip_distances)
        new = _update_medoids(x, labels, medoids, clip_distances, corr)
        if bool((new == medoids).all()):
            converged = True
            break
        medoids = new
    labels = _assign(x, medoids, clip_distances)
    return KMedoidsResult(labels=labels, medoids=medoids.long(), inertia=_inertia(x, labels, medoids, clip_distances),
                          n_iter=it, converged=converged or max_iter == 0, k=k)


def silhouette(x: Any, labels: Any, *, metric: str = "cosine", clip_distances: bool = False, samples: bool = False,
               device: Any = None, _corrections: PairCorrections | None = None, _x_ready: bool = False):
    """Mean silhouette coefficient of ``labels`` (N,) for the distance ``1 - x.y``, as
    ``sklearn.metrics.silhouette_score(D, labels, metric="precomputed")`` computes it on the dense matrix, but
    from cluster sums (O(N k d)). ``samples=True`` returns the (N,) float64 per-point values instead.
    Needs 2 <= number of distinct labels <= N - 1 (as scikit-learn)."""
    x = x if _x_ready else _as_points(x, metric, device)
    n = x.shape[0]
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor of shape ({n},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    labels = labels.to(x.device).long()
    if n and int(labels.min()) < 0:
        raise ValueError(f"labels: expected non-negative cluster ids, got min {int(labels.min())}")
    uniq, labels = torch.unique(labels, return_inverse=True)
    k = uniq.numel()
    if not 2 <= k <= n - 1:
        raise ValueError(f"labels: the silhouette needs 2 <= number of clusters <= N - 1 = {n - 1}, got {k}")
    corr = _corrections
    if clip_distances and corr is None:
        corr = PairCorrections(x)
    t, counts = _similarity_sums(x, labels, k, clip_distances, corr)
    cnt = counts.double()
    own = labels[:, None]
    n_own = cnt[labels]
    a = (n_own - 1 - t.gather(1, own)[:, 0]) / (n_own - 1)
    mean_other = (cnt[None, :] - t) / cnt[None, :]
    mean_other.scatter_(1, own, float("inf"))
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where((n_own == 1) | torch.isnan(s), torch.zeros_like(s), s)
    return s if samples else float(s.mean())


def medoids_of(x: Any, labels: Any, *, metric: str = "cosine", clip_distances: bool = False,
               device: Any = None) -> torch.Tensor:
    """The exact medoid (lowest sum of distances to the other members; first index on ties) of each cluster id
    0..max(labels), as point indices; -1 for an id with no members."""
    x = _as_points(x, metric, device)
    labels = torch.as_tensor(labels, device=x.device)
    if labels.shape != (x.shape[0],) or labels.is_floating_point() or (labels.numel() and int(labels.min()) < 0):
        raise ValueError(f"labels: expected non-negative integer cluster ids of shape ({x.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    k = int(labels.max()) + 1
    corr = PairCorrections(x) if clip_distances else None
    cost, counts = _member_costs(x, labels, k, clip_distances, corr)
    best, _ = _best_members(cost, labels, k)
    return torch.where(counts > 0, best, torch.full_like(best, -1))


@dataclass
class SweepResult:
    """The sweep's choice: ``k``, its ``silhouette``, ``labels`` and ``medoids`` (the sweep's own fit of that
    k, not a refit), ``scores`` {k: silhouette} for every k tried, ``fits`` {k: KMedoidsResult} when
    ``keep_fits=True``, and ``note`` when no k had a positive silhouette."""

    k: int
    silhouette: float
    labels: torch.Tensor
    medoids: torch.Tensor
    scores: dict[int, float] = field(default_factory=dict)
    fits: dict[int, KMedoidsResult] = field(default_factory=dict)
    note: str | None = None


def sweep(x: Any, ks: Iterable[int], *, metric: str = "cosine", seed: int = 0, max_iter: int = 300,
          clip_distances: bool = False, device: Any = None, progress: bool = False,
          keep_fits: bool = False) -> SweepResult:
    """Fit :func:`kmedoids` for every k in ``ks`` (RaVL: ``range(2C, 5C)``) and keep the one with the best
    silhouette exactly as the reference selects it: a k replaces the running best only when its silhouette is
    **strictly greater**, the running best starting at 0 (so the first of equal scores wins). The chosen fit is
    reused (the reference refits the same k with the same seed, which gives the same result). When no k has a
    positive silhouette the reference fails (KMedoids(0)); here the k with the highest silhouette is returned
    with ``note`` saying so. k values outside 2..N-1 cannot be scored and raise ValueError."""
    x = _as_points(x, metric, device)
    n = x.shape[0]
    ks = [_check_k(k, n, "ks") for k in ks]
    if not ks:
        raise ValueError("ks: expected at least one k, got none")
    bad = [k for k in ks if not 2 <= k <= n - 1]
    if bad:
        raise ValueError(f"ks: every k must be in 2..N-1 = {n - 1} to have a silhouette, got {bad}")
    corr = PairCorrections(x) if clip_distances else None
    seeds = _SeedCache()
    it = ks
    if progress:
        from vlmfast._progress import iterate

        it = iterate(ks, len(ks), "k-medoids sweep", "k")
    best_s, best_fit, best_k = 0.0, None, None
    top_s, top_fit, top_k = -math.inf, None, None
    scores: dict[int, float] = {}
    fits: dict[int, KMedoidsResult] = {}
    for k in it:
        fit = kmedoids(x, k, metric=metric, seed=seed, max_iter=max_iter, clip_distances=clip_distances,
                       _corrections=corr, _x_ready=True, _seeds=seeds)
        if int(torch.unique(fit.labels).numel()) < 2:
            s = 0.0  # every point on one medoid (duplicates): no structure to score
        else:
            s = silhouette(x, fit.labels, clip_distances=clip_distances, _corrections=corr, _x_ready=True)
        scores[k] = s
        if keep_fits:
            fits[k] = fit
        if s > best_s:
            best_s, best_fit, best_k = s, fit, k
        if s > top_s:
            top_s, top_fit, top_k = s, fit, k
    note = None
    if best_fit is None:
        best_s, best_fit, best_k = top_s, top_fit, top_k
        note = (f"no k in {ks[0]}..{ks[-1]} has a positive silhouette (best {top_s:.4f} at k = {top_k}); the "
                "reference implementation fails here")
    return SweepResult(k=best_k, silhouette=best_s, labels=best_fit.labels, medoids=best_fit.medoids,
                       scores=scores, fits=fits, note=note)
