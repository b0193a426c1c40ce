"""The op kmeans_assign: every backend against a numpy float64 oracle and the torch reference on awkward shapes,
dtypes and strides; exact ties (duplicate centroids, also across Triton tiles); NaN rows; bad input; chunking and
thread-count determinism of the chunked backends; opcheck and compile."""

import numpy as np
import pytest
import torch

import vlmfast.ops.kmeans_assign as ka
from tests._tolerances import tol
from vlmfast import BackendError
from vlmfast.functional import KMeansAssignment, kmeans_assign, kmeans_assign_ref

COMPILE_BACKEND = "aot_eager"
BACKENDS = ["torch", "cpp", "triton"]  # triton runs CPU tensors under the interpreter (forced)
METRICS = ["ip", "l2"]

NS, KS, DS = (1, 97, 1023), (1, 3, 130), (1, 7, 64, 130)
SHAPES = [(n, k, d) for n in NS for k in KS for d in DS]
# The interpreter is fast enough at these sizes (big blocks: one tile per 128 rows, centroids, features).
TRITON_SHAPES = SHAPES


def _case(N, k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=g) * 2).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    return x, c


def _oracle(x, c, metric):
    """float64 numpy: ``(v (N, k), labels, scores, scale (N,))`` with v the quantity maximised (ip: x c^T; l2:
    minus the squared distance) and scale the per-row magnitude that float32 rounding errors are relative to."""
    X = x.double().numpy()
    C = c.double().numpy()
    xn = (X * X).sum(1)
    cn = (C * C).sum(1)
    if metric == "ip":
        v = X @ C.T
        scale = np.sqrt(xn) * np.sqrt(cn.max())
    else:
        v = -np.maximum(xn[:, None] - 2 * X @ C.T + cn[None, :], 0.0)
        scale = xn + cn.max()
    labels = v.argmax(1)  # first index on ties
    best = v[np.arange(len(X)), labels]
    return v, labels, (best if metric == "ip" else -best), scale + 1e-30


def _assert_labels(got, want, v, scale, dtype, what="labels"):
    """Equal, except rows whose two candidates are within the near-tie gap (float64 scores)."""
    gap = tol("kmeans_assign", dtype, "tie")["atol"]
    got = got.numpy()
    rows = np.nonzero(got != want)[0]
    for i in rows:
        assert 0 <= got[i] < v.shape[1], f"{what}: row {i} label {got[i]} out of range"
        diff = v[i, want[i]] - v[i, got[i]]
        assert diff <= gap * scale[i], (f"{what}: row {i} got {got[i]}, expected {want[i]} (float64 gap {diff:.3g} > "
                                        f"{gap} * scale {scale[i]:.3g})")
    return len(rows)


def _assert_result(out, x, c, metric, dtype=torch.float32):
    N, d = x.shape
    k = c.shape[0]
    assert isinstance(out, KMeansAssignment)
    assert out.labels.dtype == torch.int64 and out.labels.shape == (N,)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (N,)
    assert out.sums.dtype == torch.float32 and out.sums.shape == (k, d)
    assert out.counts.dtype == torch.int64 and out.counts.shape == (k,)
    v, labels, scores, scale = _oracle(x, c, metric)
    _assert_labels(out.labels, labels, v, scale, dtype)
    atol, rtol = tol("kmeans_assign", dtype, "score").values()
    err = np.abs(out.scores.double().numpy() - scores)
    bound = atol * scale + rtol * np.abs(scores)
    assert (err <= bound).all(), f"scores: worst excess {np.max(err - bound):.3g} at row {int(np.argmax(err - bound))}"
    # sums and counts of the labels that came back (float64 numpy)
    lab = out.labels.numpy()
    X = x.double().numpy()
    want_sums = np.zeros((k, d))
    np.add.at(want_sums, lab, X)
    assert np.array_equal(out.counts.numpy(), np.bincount(lab, minlength=k))
    atol, rtol = tol("kmeans_assign", dtype, "sums").values()
    mx = float(np.abs(X).max()) if X.size else 1.0
    np.testing.assert_allclose(out.sums.double().numpy(), want_sums, atol=atol * mx, rtol=rtol)


def _params(shapes_all, shapes_triton):
    return [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}")
            for b in BACKENDS for s in (shapes_triton if b == "triton" else shapes_all)]


@pytest.mark.parametrize("backend,shape", _params(SHAPES, TRITON_SHAPES))
def test_backends_match_float64_oracle_and_reference(backend, shape):
    x, c = _case(*shape)
    for metric in METRICS:
        out = kmeans_assign(x, c, metric=metric, backend=backend)
        _assert_result(out, x, c, metric)
        ref = kmeans_assign_ref(x, c, metric=metric)
        v, _, _, scale = _oracle(x, c, metric)
        _assert_labels(out.labels, ref.labels.numpy(), v, scale, torch.float32, "labels vs reference")
        if backend in ("torch", "cpp"):  # the same driver and GEMMs: identical results
            for a, b in zip(out, ref):
                assert torch.equal(a, b)


def test_reference_against_oracle_and_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ip = kmeans_assign_ref(x, c, metric="ip")
    assert ip.labels.tolist() == [0, 1, 0, 1]  # (3, 3): a tie -> first; (-1, 0): 0 > -1
    assert ip.scores.tolist() == [1.0, 2.0, 3.0, 0.0]
    assert ip.counts.tolist() == [2, 2]
    assert ip.sums.tolist() == [[4.0, 3.0], [-1.0, 2.0]]
    l2 = kmeans_assign_ref(x, c, metric="l2")
    assert l2.labels.tolist() == [0, 1, 0, 1]  # (-1, 0): |(-2, 0)|^2 = 4 > |(-1, -1)|^2 = 2
    assert l2.scores.tolist() == [0.0, 1.0, 13.0, 2.0]
    x, c = _case(300, 17, 33)
    for metric in METRICS:
        _assert_result(kmeans_assign_ref(x, c, metric=metric), x, c, metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    x, c = _case(97, 130, 64, dtype=dtype)
    for metric in METRICS:
        _assert_result(kmeans_assign(x, c, metric=metric, backend=backend), x, c, metric, dtype)
    # mixed: 16-bit points, float32 centroids
    cf = torch.randn(5, 64)
    _assert_result(kmeans_assign(x, cf, metric="l2", backend=backend), x, cf, "l2", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 2 * 40, generator=g)[:, ::2]  # strided columns
    c = torch.randn(40, 21, generator=g).t()  # (21, 40), transposed
    assert not x.is_contiguous() and not c.is_contiguous()
    for metric in METRICS:
        out = kmeans_assign(x, c, metric=metric, backend=backend)
        _assert_result(out, x, c, metric)
        ref = kmeans_assign(x.contiguous(), c.contiguous(), metric=metric, backend=backend)
        assert torch.equal(out.labels, ref.labels)
    row = torch.randn(1, 40, generator=g).expand(9, 40)  # stride-0 rows
    out = kmeans_assign(row, c, metric="l2", backend=backend)
    assert out.labels.unique().numel() == 1 and int(out.counts.sum()) == 9
    _assert_result(out, row, c, "l2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_go_to_the_first_centroid(backend):
    # Small integers: every product and sum is exact in float32, so the labels must equal the oracle exactly.
    g = torch.Generator().manual_seed(5)
    c = torch.randint(-3, 4, (40, 6), generator=g).float()
    c[17] = c[3]
    c[39] = c[3]
    c[25] = c[11]
    x = torch.cat([c[[3, 11, 39, 25]], torch.randint(-3, 4, (60, 6), generator=g).float()])
    for metric in METRICS:
        out = kmeans_assign(x, c, metric=metric, backend=backend)
        _, labels, scores, _ = _oracle(x, c, metric)
        assert out.labels.tolist() == labels.tolist()
        assert out.scores.tolist() == scores.astype(np.float32).tolist()
        assert 17 not in out.labels.tolist() and 39 not in out.labels.tolist() and 25 not in out.labels.tolist()
    same = kmeans_assign(x, c[[3] * 5], backend=backend)  # every centroid equal: all label 0
    assert same.labels.eq(0).all() and same.counts.tolist() == [64, 0, 0, 0, 0]


def test_triton_ties_and_nan_across_centroid_tiles():
    from vlmfast.kernels.kmeans_assign import kmeans_assign_forward

    g = torch.Generator().manual_seed(6)
    c = torch.randint(-2, 3, (50, 5), generator=g).float()
    c[20] = c[2]  # the same centroid in tiles 0 and 1 (BLOCK_K = 16)
    c[45] = c[2]
    c[33] = c[40]
    c[7] = float("nan")
    x = torch.cat([c[[2, 40, 33]], torch.randint(-2, 3, (30, 5), generator=g).float()])
    for l2 in (False, True):
        lab, sc = kmeans_assign_forward(x, c, l2, block_n=16, block_k=16, block_d=16)
        ref = kmeans_assign_ref(x, c, metric="l2" if l2 else "ip")
        assert lab.tolist() == ref.labels.tolist()
        assert torch.equal(sc, ref.scores)
        assert 7 not in lab.tolist() and 20 not in lab.tolist() and 45 not in lab.tolist()
        if l2:  # a point on a centroid: distance 0 to it (and to its later copies)
            assert lab[:3].tolist() == [2, 33, 33] and sc[:3].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_and_centroids(backend):
    x, c = _case(20, 9, 8)
    x[3, 2] = float("nan")
    c[4, 0] = float("nan")  # never chosen
    for metric in METRICS:
        out = kmeans_assign(x, c, metric=metric, backend=backend)
        assert out.labels[3] == -1 and torch.isnan(out.scores[3])
        keep = torch.arange(20) != 3
        assert (out.labels[keep] >= 0).all() and not (out.labels == 4).any()
        assert int(out.counts.sum()) == 19 and int(out.counts[4]) == 0
        assert torch.isfinite(out.sums).all()
        clean = kmeans_assign_ref(x[keep], torch.cat([c[:4], c[5:]]), metric=metric)
        assert torch.equal(out.labels[keep], clean.labels + (clean.labels >= 4).long())
        torch.testing.assert_close(out.scores[keep], clean.scores)
        torch.testing.assert_close(out.sums[[0, 1, 2, 3, 5, 6, 7, 8]], clean.sums)
    allnan = kmeans_assign(x, torch.full((3, 8), float("nan")), backend=backend)
    assert (allnan.labels == -1).all() and torch.isnan(allnan.scores).all() and (allnan.counts == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_centroid(backend):
    x, c = _case(0, 4, 5)
    out = kmeans_assign(x, c, metric="l2", backend=backend)
    assert out.labels.shape == (0,) and out.scores.shape == (0,)
    assert torch.equal(out.sums, torch.zeros(4, 5)) and torch.equal(out.counts, torch.zeros(4, dtype=torch.int64))
    x, c = _case(13, 1, 5)
    out = kmeans_assign(x, c, backend=backend)
    assert out.labels.eq(0).all() and out.counts.tolist() == [13]
    torch.testing.assert_close(out.sums[0], x.sum(0))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_chunked_driver_matches_one_chunk(backend, monkeypatch):
    x, c = _case(1023, 130, 64, seed=2)
    for metric in METRICS:
        whole = kmeans_assign(x, c, metric=metric, backend=backend)
        monkeypatch.setattr(ka, "CHUNK_ELEMS", 130 * 37)  # 37-row chunks
        chunked = kmeans_assign(x, c, metric=metric, backend=backend)
        monkeypatch.undo()
        v, _, _, scale = _oracle(x, c, metric)
        _assert_labels(chunked.labels, whole.labels.numpy(), v, scale, torch.float32)  # GEMM blocking may differ
        if torch.equal(whole.labels, chunked.labels):
            assert torch.equal(whole.counts, chunked.counts)
            assert torch.equal(whole.sums, chunked.sums)  # float64 sums in row order, across chunks too
        _assert_result(chunked, x, c, metric)


def test_cpp_kernel_is_independent_of_the_thread_count():
    from vlmfast._C_loader import get_C, tensor_view

    x, c = _case(1023, 130, 64, seed=4)
    z = x @ c.t()
    cc = ka.sqnorms(c)
    xx = ka.sqnorms(x)
    outs = []
    for threads in (1, 2, 3):
        lab, sc = torch.empty(1023, dtype=torch.int64), torch.empty(1023)
        sums, counts = torch.zeros(130, 64, dtype=torch.float64), torch.zeros(130, dtype=torch.int64)
        get_C().kmeans_assign_rows(tensor_view(z), tensor_view(x), tensor_view(xx), tensor_view(cc), True,
                                   tensor_view(lab), tensor_view(sc), tensor_view(sums), tensor_view(counts), threads)
        outs.append((lab, sc, sums, counts))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"sums: expected shape \(130, 64\)"):
        get_C().kmeans_assign_rows(tensor_view(z), tensor_view(x), None, None, False, tensor_view(lab),
                                   tensor_view(sc), tensor_view(sums[:5]), tensor_view(counts), 1)


def test_bad_inputs():
    x, c = _case(5, 3, 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, d\), got \(4,\)"):
        kmeans_assign(x[0], c)
    with pytest.raises(ValueError, match=r"centroids: expected shape \(k, d\), got \(1, 3, 4\)"):
        kmeans_assign(x, c[None])
    with pytest.raises(ValueError, match=r"centroids: expected feature width d = 4 \(x \(5, 4\)\), got \(3, 5\)"):
        kmeans_assign(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"centroids: expected k >= 1 centroids, got shape \(0, 4\)"):
        kmeans_assign(x, c[:0])
    with pytest.raises(ValueError, match=r"x: expected d >= 1 features"):
        kmeans_assign(x[:, :0], c[:, :0])
    with pytest.raises(TypeError, match="x: expected float32, float16 or bfloat16, got torch.int64"):
        kmeans_assign(x.long(), c)
    with pytest.raises(TypeError, match="centroids: expected float32, float16 or bfloat16, got torch.float64"):
        kmeans_assign(x, c.double())
    with pytest.raises(TypeError, match="x: expected a tensor, got list"):
        kmeans_assign([[1.0]], c)
    with pytest.raises(ValueError, match="metric: expected 'ip' or 'l2', got 'cos'"):
        kmeans_assign(x, c, metric="cos")
    with pytest.raises(TypeError, match="metric: expected a str"):
        kmeans_assign(x, c, metric=2)
    with pytest.raises(ValueError, match="centroids: expected a tensor with data"):
        kmeans_assign(x, c.to("meta"))
    with pytest.raises(BackendError):
        kmeans_assign(x, c, backend="cuda")  # no CUDA tensors here (and no cuda implementation)
    with pytest.raises(ValueError, match="backend: expected one of"):
        kmeans_assign(x, c, backend="nope")


@pytest.mark.cuda
def test_device_mismatch_and_cuda_backends():
    x, c = _case(300, 70, 64)
    with pytest.raises(ValueError, match=r"centroids: expected on x's device cuda:0, got cpu"):
        kmeans_assign(x.cuda(), c)
    for backend in ("triton", "torch"):
        for metric in METRICS:
            out = kmeans_assign(x.cuda(), c.cuda(), metric=metric, backend=backend)
            _assert_result(KMeansAssignment(*(t.cpu() for t in out)), x, c, metric)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, c = _case(19, 5, 16)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.vlmfast.kmeans_assign.default, (x, c, metric, backend))


@pytest.mark.parametrize("backend", [None, "cpp"])
def test_compiles_fullgraph(backend):
    x, c = _case(41, 9, 16)

    def f(x, c):
        out = kmeans_assign(x, c, metric="l2", backend=backend)
        return out.labels, out.scores.sum(), out.sums / out.counts.clamp_min(1).unsqueeze(1)

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    for a, b in zip(compiled(x, c), f(x, c)):
        assert torch.equal(a, b)
