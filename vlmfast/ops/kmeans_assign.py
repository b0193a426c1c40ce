"""The op ``kmeans_assign``: the assignment step of k-means (Lloyd) — nearest centroid per point — fused with the
per-centroid sums and counts of the update step, without an ``N x k`` score matrix.

Inputs: points ``x (N, d)`` and centroids ``centroids (k, d)``, float32 / float16 / bfloat16 (they may differ), 2-D,
any strides, on one device; ``N >= 0``, ``k >= 1``, ``d >= 1``. ``metric`` is ``"ip"`` or ``"l2"``. Every backend
upcasts to float32 and computes, per point ``i``, with ``z_ij = <x_i, c_j>`` accumulated in float32:

* ``metric="ip"``: ``labels_i = argmax_j z_ij``, ``scores_i = max_j z_ij`` (the largest inner product);
* ``metric="l2"``: ``labels_i = argmin_j ||x_i - c_j||^2``, ``scores_i`` = that squared distance, evaluated as
  ``v_ij = 2 z_ij - ||c_j||^2``, ``labels_i = argmax_j v_ij``, ``scores_i = max(||x_i||^2 - max_j v_ij, 0)`` (the
  expanded form that FAISS and every GEMM-based k-means use: exact ranking up to float32 rounding, and the clamp
  at 0 hides the cancellation of a point that sits on its centroid);
* ties go to the **first** (lowest) centroid index, as ``torch.argmax``; exactly duplicated centroids therefore
  always lose to their first copy;
* ``sums (k, d)`` float32: ``sums_j = sum of the x_i with labels_i == j`` (the upcast rows), accumulated in
  **float64** in row order and rounded to float32 once; ``counts (k,)`` int64: the number of such rows. A centroid
  that no point chose has sum 0 and count 0 (k-means re-seeds those; see :func:`vlmfast.cluster.kmeans`).

**NaN and inf.** A NaN score (a NaN in the point or the centroid, or ``inf * 0``) is never selected: the label is
the first index of the best score among the non-NaN ones. A point whose scores are **all** NaN (in practice: a
NaN in the point) gets ``label = -1`` and ``score = NaN`` and is left out of ``sums`` and ``counts``. Infinite
scores take part as the IEEE values they are (``+inf`` wins; for ``"l2"`` an infinite point gives ``inf - inf``
= NaN scores, hence label -1). Nothing raises on values (no host sync): check ``(labels < 0).any()`` yourself.

**Backends** (all give the same labels up to float32 rounding of near-ties, i.e. points whose two best scores
differ by about ``d * 2^-24 * ||x|| ||c||``; ``cpp`` and ``torch`` run the same GEMMs and give identical results):

* ``triton`` (``kernels/kmeans_assign.py``): one program per block of rows loops over centroid tiles, each a
  ``tl.dot`` over d chunks (float32 inputs: IEEE fp32 FMAs; 16-bit inputs: upcast to float32, TF32 on a GPU,
  exact for fp16/bf16 values), with an online first-index argmax: no ``N x k`` matrix. ``||x||^2`` is summed in
  the kernel, ``||c||^2`` comes from torch. Sums and counts: a torch ``index_add_`` (float64) over the labels
  after the kernel (atomic on a GPU: the float64 sums can differ in the last bits between runs before rounding
  to float32, which hides it in practice).
* ``cpp``: torch's BLAS GEMM ``x_chunk @ c^T`` on row chunks of at most ``CHUNK_ELEMS`` scores (the extension
  links no BLAS; ``docs/adding_an_op.md``, "GEMM-shaped ops on CPU"), then one OpenMP pass of
  ``csrc/kmeans_assign.cpp`` per chunk: a vectorised first-index argmax per row and the float64 accumulation of
  the sums, split over feature columns so that every sum is added in row order by one thread (deterministic,
  independent of the thread count).
* ``torch``: :func:`kmeans_assign_ref`, the same chunked driver with torch row functions; the CPU/GPU fallback
  and the test oracle's twin (the tests also compare with numpy float64).

``cpp`` and ``torch`` run the same GEMMs and the same ``||x||^2`` reduction (torch's), so their labels, scores,
sums and counts are identical.

The op is not differentiable (a clustering step). Layers (``docs/adding_an_op.md``): backend forwards registered
with :mod:`vlmfast._dispatch`, behind ``torch.ops.vlmfast.kmeans_assign`` (custom op with a fake, so it runs inside
``torch.compile(fullgraph=True)``), behind the functional :func:`kmeans_assign`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view
from vlmfast.ops._features import check_features, dtype_reasons

OP = "kmeans_assign"
METRICS = ("ip", "l2")
CHUNK_ELEMS = 1 << 22  # scores (or upcast features) per row chunk of the chunked backends: 16 MB of float32


def _probe(device: str) -> dict[str, Any]:
    return {"x": torch.empty(1, 4, device=device), "centroids": torch.empty(2, 4, device=device), "metric": "ip"}


_dispatch.define_op(OP, device_arg="x", probe=_probe, differentiable=False, module=__name__)


class KMeansAssignment(NamedTuple):
    """What :func:`kmeans_assign` returns: ``labels (N,)`` int64 (-1 for all-NaN rows), ``scores (N,)`` float32
    (best inner product, or squared distance), ``sums (k, d)`` float32 and ``counts (k,)`` int64 per centroid."""

    labels: Tensor
    scores: Tensor
    sums: Tensor
    counts: Tensor


# ----------------------------------------------------------------------------------------------------------
# Shared math: squared norms, the chunked driver (torch and cpp), the float64 accumulation (torch and triton)
# ----------------------------------------------------------------------------------------------------------


def sqnorms(t: Tensor) -> Tensor:
    """``||t_i||^2`` in float32 (one definition for every backend's ``||c||^2``)."""
    tf = t.float()
    return (tf * tf).sum(dim=1)


def _rows(k: int, d: int) -> int:
    return max(1, CHUNK_ELEMS // max(k, d, 1))


def _assign_chunked(x: Tensor, c: Tensor, metric: str, rows_fn: Callable) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row chunks of at most ``CHUNK_ELEMS`` scores: the GEMM by torch, then ``rows_fn`` (``||x||^2`` for l2, argmax,
    scores, and the accumulation into float64 sums / int64 counts with one spare slot ``k`` for the label -1 rows)."""
    N, d = x.shape
    k = c.shape[0]
    l2 = metric == "l2"
    cf = c.float()
    cc = sqnorms(c) if l2 else None
    labels = x.new_empty(N, dtype=torch.int64)
    scores = x.new_empty(N, dtype=torch.float32)
    sums = x.new_zeros(k + 1, d, dtype=torch.float64)
    counts = x.new_zeros(k + 1, dtype=torch.int64)
    step = _rows(k, d)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        xf = x[r0:r1].float()
        z = torch.mm(xf, cf.t())
        rows_fn(z, xf, cc, l2, labels[r0:r1], scores[r0:r1], sums, counts)
    return labels, scores, sums[:k].to(torch.float32), counts[:k].clone()


def _rows_torch(z, xf, cc, l2, labels, scores, sums, counts):
    k = z.shape[1]
    xx = (xf * xf).sum(dim=1) if l2 else None
    v = z.mul_(2.0).sub_(cc) if l2 else z
    mx = v.masked_fill(torch.isnan(v), float("-inf")).amax(dim=1)
    hit = v == mx.unsqueeze(1)  # NaN never equals: only the non-NaN maxima
    ok = hit.any(dim=1)  # False only when every score is NaN
    first = hit.to(torch.uint8).argmax(dim=1)  # the first maximum (torch.argmax: first index on ties)
    best = (xx - mx).clamp_min(0.0) if l2 else mx
    labels.copy_(torch.where(ok, first, torch.full_like(first, -1)))
    scores.copy_(torch.where(ok, best, torch.full_like(best, float("nan"))))
    _accumulate_rows(xf, labels, k, sums, counts)


def _accumulate_rows(xf: Tensor, labels: Tensor, k: int, sums: Tensor, counts: Tensor) -> None:
    """``sums[j] += x_i`` (float64) and ``counts[j] += 1`` for ``labels_i == j``; label -1 goes to slot ``k``
    (no boolean indexing: no host sync)."""
    slot = torch.where(labels < 0, torch.full_like(labels, k), labels)
    sums.index_add_(0, slot, xf.double())
    counts.index_add_(0, slot, torch.ones_like(slot))


def accumulate(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(sums (k, d) float32, counts (k,) int64)`` of the rows of ``x`` by ``labels`` (-1: left out), in float64
    row chunks of bounded size (the follow-up of the Triton backend; also used by k-means)."""
    N, d = x.shape
    sums = x.new_zeros(k + 1, d, dtype=torch.float64)
    counts = x.new_zeros(k + 1, dtype=torch.int64)
    step = _rows(1, d)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        _accumulate_rows(x[r0:r1].float(), labels[r0:r1], k, sums, counts)
    return sums[:k].to(torch.float32), counts[:k].clone()


# ----------------------------------------------------------------------------------------------------------
# Backends: forward(x, centroids, metric) -> (labels, scores, sums, counts)
# ----------------------------------------------------------------------------------------------------------


def _check_dtypes(x: Tensor, centroids: Tensor, **_) -> list[str]:
    return dtype_reasons(x=x, centroids=centroids)


@_dispatch.register(OP, "torch")
def _kmeans_assign_torch(x, centroids, metric):
    return _assign_chunked(x, centroids, metric, _rows_torch)


def _check_cpp(x: Tensor, centroids: Tensor, **_) -> list[str]:
    reasons = _check_dtypes(x, centroids)
    try:
        if not hasattr(get_C(), "kmeans_assign_rows"):
            reasons.append("the built extension has no kmeans_assign kernel (rebuild: pip install -e .)")
    except Exception as exc:  # the backend's own availability reports a missing extension
        reasons.append(str(exc))
    return reasons


def _rows_cpp(z, xf, cc, l2, labels, scores, sums, counts):
    k = z.shape[1]
    xx = (xf * xf).sum(dim=1) if l2 else None  # the same ||x||^2 as the torch rows: identical l2 scores
    get_C().kmeans_assign_rows(tensor_view(z), tensor_view(xf), tensor_view(xx) if l2 else None,
                               tensor_view(cc) if l2 else None, bool(l2),
                               tensor_view(labels), tensor_view(scores), tensor_view(sums[:k]),
                               tensor_view(counts[:k]), torch.get_num_threads())


@_dispatch.register(OP, "cpp", _check_cpp)
def _kmeans_assign_cpp(x, centroids, metric):
    return _assign_chunked(x, centroids, metric, _rows_cpp)


@_dispatch.register(OP, "triton", _check_dtypes, module="vlmfast.kernels.kmeans_assign")
def _kmeans_assign_triton(x, centroids, metric):
    from vlmfast.kernels.kmeans_assign import kmeans_assign_forward

    l2 = metric == "l2"
    labels, scores = kmeans_assign_forward(x, centroids, l2, sqnorms(centroids) if l2 else None)
    sums, counts = accumulate(x, labels, centroids.shape[0])
    return labels, scores, sums, counts


# ----------------------------------------------------------------------------------------------------------
# torch.library op (dispatches inside; fake for compile)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmfast::kmeans_assign", mutates_args=())
def _kmeans_assign_op(x: Tensor, centroids: Tensor, metric: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(labels (N,) int64, scores (N,) float32, sums (k, d) float32, counts (k,) int64)`` for validated 2-D
    ``x``, ``centroids``; ``backend`` a backend name or ``""`` (the dispatcher's choice)."""
    impl = _dispatch.select(OP, backend or None, x=x, centroids=centroids, metric=metric)
    return tuple(t.clone() if t._base is not None else t for t in impl.forward(x, centroids, metric))


@_kmeans_assign_op.register_fake
def _kmeans_assign_fake(x, centroids, metric, backend):
    N, d = x.shape
    k = centroids.shape[0]
    return (x.new_empty(N, dtype=torch.int64), x.new_empty(N, dtype=torch.float32),
            x.new_empty(k, d, dtype=torch.float32), x.new_empty(k, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def check_inputs(x: Any, centroids: Any, metric: Any) -> tuple[Tensor, Tensor, str]:
    """Metadata checks (no host sync): TypeError/ValueError naming the argument, the expected and the actual."""
    x = check_features(x, "x", "(N, d)")
    centroids = check_features(centroids, "centroids", "(k, d)")
    N, d = x.shape
    k, dc = centroids.shape
    if d < 1:
        raise ValueError(f"x: expected d >= 1 features, got shape {tuple(x.shape)}")
    if dc != d:
        raise ValueError(f"centroids: expected feature width d = {d} (x {tuple(x.shape)}), got {tuple(centroids.shape)}")
    if k < 1:
        raise ValueError(f"centroids: expected k >= 1 centroids, got shape {tuple(centroids.shape)}")
    if centroids.device != x.device:
        raise ValueError(f"centroids: expected on x's device {x.device}, got {centroids.device}")
    if not isinstance(metric, str):
        raise TypeError(f"metric: expected a str ('ip' or 'l2'), got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected 'ip' or 'l2', got {metric!r}")
    return x, centroids, metric


def kmeans_assign(x: Tensor, centroids: Tensor, *, metric: str = "ip", backend: str | None = None) -> KMeansAssignment:
    """Nearest centroid of every point, with the per-centroid sums and counts (module docs).

    Args:
        x: ``(N, d)`` points, float32/float16/bfloat16, CPU or CUDA, any strides; ``N`` may be 0.
        centroids: ``(k, d)``, ``k >= 1``, on x's device (dtype may differ from x's).
        metric: ``"ip"`` (largest inner product: spherical k-means on normalized data) or ``"l2"`` (smallest
            squared Euclidean distance).
        backend: force ``"triton"``, ``"cpp"`` or ``"torch"`` (default: the first that can run; also
            ``VLMFAST_BACKEND``).

    Returns:
        :class:`KMeansAssignment` ``(labels, scores, sums, counts)``. Rows whose scores are all NaN get label -1
        and are left out of the sums and counts (no error is raised; no host sync).
    """
    x, centroids, metric = check_inputs(x, centroids, metric)
    compiling = torch.compiler.is_compiling()
    name = (backend or "") if compiling else _dispatch.choose(OP, backend, x=x, centroids=centroids, metric=metric)
    labels, scores, sums, counts = torch.ops.vlmfast.kmeans_assign(x, centroids, metric, name)
    return KMeansAssignment(labels, scores, sums, counts)


def kmeans_assign_ref(x: Tensor, centroids: Tensor, *, metric: str = "ip") -> KMeansAssignment:
    """The torch reference (chunked over rows: at most ``CHUNK_ELEMS`` scores at a time), importable without
    Triton or the extension; the CPU/GPU fallback and the tests' oracle."""
    x, centroids, metric = check_inputs(x, centroids, metric)
    return KMeansAssignment(*_assign_chunked(x, centroids, metric, _rows_torch))


__all__ = ["KMeansAssignment", "kmeans_assign", "kmeans_assign_ref", "accumulate", "sqnorms"]
