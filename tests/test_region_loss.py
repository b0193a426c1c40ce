"""The op region_loss (RaVL's region-aware loss): every backend against autograd through the per-image loop formula
(region_loss_ref) and against a numpy float64 oracle with central-difference gradients, values and gradients of the
regions and the text, on awkward shapes, dtypes and strides; images without relevant regions, batches without
spurious regions, all-padding batches, duplicate labels, ties, "spurious wins"; a hand-computed case; chunking and
class tiles; bad input; opcheck and compile."""

import math

import numpy as np
import pytest
import torch

import vlmfast.ops.region_loss as RL
from tests._tolerances import tol
from vlmfast.functional import region_loss, region_loss_ref

COMPILE_BACKEND = "aot_eager"
BACKENDS = ["torch", "cpp", "triton"]  # triton runs CPU tensors under the interpreter (forced)
SHAPES = [(1, 1, 16, 1), (7, 4, 97, 3), (33, 9, 16, 10), (33, 4, 97, 10), (7, 9, 16, 1)]  # (B, R, D, C)
TRITON_SHAPES = [(1, 1, 16, 1), (7, 4, 97, 3), (33, 9, 16, 10)]


def _case(B, R, D, C, dtype=torch.float32, seed=0, p_rel=0.4, p_spu=0.3):
    """Random embeddings (continuous: tie-free), labels and region kinds (0 padding, 1 relevant, 2 spurious); image 0
    always has a relevant region 0 so that the loss is never trivially 0."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, R, D, generator=g) * 2).to(dtype)
    t = torch.randn(C, D, generator=g).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    u = torch.rand(B, R, generator=g)
    rel = u < p_rel
    spu = (u >= p_rel) & (u < p_rel + p_spu)
    rel[0, 0], spu[0, 0] = True, False
    return x, t, y, rel, spu


def _params(all_shapes, triton_shapes):
    return [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}") for b in BACKENDS
            for s in (triton_shapes if b == "triton" else all_shapes)]


def _run(fn, x, t, y, rel, spu, **kw):
    """Values ``(loss, L_R, L_A)`` and the gradients wrt (regions, text) of ``loss`` (weighted by image for
    ``none``) + 0.5 sum L_R - 0.25 sum L_A (every output's backward is exercised)."""
    a, b = x.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    out = fn(a, b, y, rel, spu, **kw)
    loss = out.loss
    main = loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel())).sum()
    total = main + 0.5 * out.relevance_loss.sum() - 0.25 * out.attribute_loss.sum()
    ga, gb = torch.autograd.grad(total, [a, b], allow_unused=True)
    ga = torch.zeros_like(a) if ga is None else ga
    gb = torch.zeros_like(b) if gb is None else gb
    return [v.detach() for v in (loss, out.relevance_loss, out.attribute_loss)], [ga, gb]


def _ref(x, t, y, rel, spu, **kw):
    return _run(region_loss_ref, x.float(), t.float(), y, rel, spu, **kw)


def _assert_close(got, want, dtype, grad_dtypes=None):
    (gv, gg), (wv, wg) = got, want
    for name, a, c in zip(("loss", "L_R", "L_A"), gv, wv):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, c, **tol("region_loss", dtype, "loss"), msg=lambda m: f"{name}: {m}")
    atol, rtol = tol("region_loss", dtype, "grad").values()
    for i, (name, a, c) in enumerate(zip(("d regions", "d text"), gg, wg)):
        assert a.dtype == (grad_dtypes[i] if grad_dtypes else dtype), name
        assert torch.isfinite(a).all(), name
        scale = float(c.abs().max()) or 1.0
        torch.testing.assert_close(a.float(), c, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,shape", _params(SHAPES, TRITON_SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_match_reference(backend, shape, reduction):
    x, t, y, rel, spu = _case(*shape, seed=sum(shape))
    kw = dict(reduction=reduction, temperature=0.1)
    _assert_close(_run(region_loss, x, t, y, rel, spu, backend=backend, **kw), _ref(x, t, y, rel, spu, **kw),
                  torch.float32)


# ----------------------------------------------------------------------------------------------------------
# An independent float64 oracle: the formula in numpy loops, gradients by central differences
# ----------------------------------------------------------------------------------------------------------


def _oracle_losses(x, t, y, rel, spu, tau, normalize):
    B, R, _ = x.shape
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    rel = rel & ~spu
    sim = np.einsum("brd,cd->brc", x, t) / tau
    YB = sorted(set(int(v) for v in y))
    S = [(b, r) for b in range(B) for r in range(R) if spu[b, r]]
    H = [i for i in range(B) if rel[i].any()]

    def m(i, c):
        return max(sim[i, r, c] for r in range(R) if rel[i, r])

    lr, la = np.zeros(B), np.zeros(B)
    for i in H:
        yi = int(y[i])
        lr[i] = -m(i, yi) + math.log(sum(math.exp(m(i, c)) for c in YB)
                                     + sum(max(math.exp(sim[b, r, c]) for c in YB) for b, r in S))
        la[i] = -m(i, yi) + math.log(math.exp(m(i, yi)) + sum(math.exp(m(j, yi)) for j in H if int(y[j]) != yi)
                                     + sum(math.exp(sim[b, r, yi]) for b, r in S))
    return lr, la, len(H)


def _oracle_total(x, t, y, rel, spu, tau, normalize):
    lr, la, n = _oracle_losses(x, t, y, rel, spu, tau, normalize)
    return (lr + la).sum() / max(n, 1)


def _central_diff(f, arr, h=1e-6):
    g = np.zeros_like(arr)
    for idx in np.ndindex(*arr.shape):
        old = arr[idx]
        arr[idx] = old + h
        fp = f()
        arr[idx] = old - h
        fm = f()
        arr[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


@pytest.fixture(scope="module")
def oracle_case():
    B, R, D, C = 5, 3, 6, 3
    x, t, _, _, _ = _case(B, R, D, C, seed=42)
    y = torch.tensor([0, 2, 0, 1, 2])  # duplicate labels
    rel = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)  # image 3: none
    spu = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    xd, td = x.double().numpy().copy(), t.double().numpy().copy()
    yn, rn, sn = y.numpy(), rel.numpy(), spu.numpy()
    out = {}
    for normalize in (True, False):
        tau = 0.2 if normalize else 1.5
        lr, la, _ = _oracle_losses(xd, td, yn, rn, sn, tau, normalize)
        f = lambda: _oracle_total(xd, td, yn, rn, sn, tau, normalize)  # noqa: E731
        out[normalize] = (tau, lr, la, _central_diff(f, xd), _central_diff(f, td))
    return (x, t, y, rel, spu), out


@pytest.mark.parametrize("backend", ["ref"] + BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_against_float64_oracle(backend, normalize, oracle_case):
    (x, t, y, rel, spu), out = oracle_case
    tau, lr, la, dx, dt = out[normalize]
    fn = region_loss_ref if backend == "ref" else region_loss
    kw = {} if backend == "ref" else {"backend": backend}
    a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
    res = fn(a, b, y, rel, spu, temperature=tau, normalize=normalize, **kw)
    ga, gb = torch.autograd.grad(res.loss, [a, b])
    o = tol("region_loss", torch.float32, "oracle")
    torch.testing.assert_close(res.relevance_loss.double(), torch.from_numpy(lr), **o)
    torch.testing.assert_close(res.attribute_loss.double(), torch.from_numpy(la), **o)
    torch.testing.assert_close(res.loss.double(), torch.tensor((lr + la).sum() / 4), **o)
    atol, rtol = tol("region_loss", torch.float32, "oracle_grad").values()
    for got, want in ((ga, dx), (gb, dt)):
        want = torch.from_numpy(want)
        torch.testing.assert_close(got.double(), want, atol=atol * float(want.abs().max()), rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    """One image, a relevant region along class 0's text and a spurious one along class 1's, label 0, tau = 1:
    m(0) = 1, Y_B = {0}, the spurious region's best match over Y_B is sim(r1, 0) = 0, so
    L_R = L_A = -1 + log(e + 1) and the loss is 2 log(1 + 1/e)."""
    x = torch.tensor([[[3.0, 0.0], [0.0, 0.5]]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = region_loss(x, t, torch.tensor([0]), torch.tensor([[True, False]]), torch.tensor([[False, True]]),
                      temperature=1.0, backend=backend)
    assert float(out.loss) == pytest.approx(2 * math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert float(out.relevance_loss[0]) == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# dtypes, strides, edge cases, ties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    x, t, y, rel, spu = _case(7, 4, 97, 3, dtype=dtype, seed=5)
    _assert_close(_run(region_loss, x, t, y, rel, spu, backend=backend), _ref(x, t, y, rel, spu), dtype)
    # mixed: float32 regions, bfloat16 text
    got = _run(region_loss, x.float(), t, y, rel, spu, backend=backend)
    _assert_close(got, _ref(x, t, y, rel, spu), dtype, grad_dtypes=(torch.float32, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_non_contiguous_inputs(backend, normalize):
    x, t, y, rel, spu = _case(7, 4, 16, 3, seed=7)
    xs = torch.stack([x, -x], dim=3).flatten(2)[:, :, ::2]  # stride 2 features
    xp = x.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # region-major
    tc = t.t().contiguous().t()  # column-major
    rel_t, spu_t = rel.t().contiguous().t(), spu.t().contiguous().t()
    y2 = torch.stack([y, y], dim=1)[:, 0]
    assert not (xs.is_contiguous() or xp.is_contiguous() or tc.is_contiguous() or rel_t.is_contiguous()
                or y2.is_contiguous())
    want = _ref(x, t, y, rel, spu, normalize=normalize, temperature=0.5)
    for xx in (xs, xp):
        got = _run(region_loss, xx, tc, y2, rel_t, spu_t, backend=backend, normalize=normalize, temperature=0.5)
        _assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    x, t, y, rel, spu = _case(7, 4, 16, 3, seed=9)
    # zero padding rows (normalize=True must give no NaN), images without relevant regions
    pad = ~(rel | spu)
    x = x.masked_fill(pad.unsqueeze(2), 0.0)
    rel[3:] = False
    cases = {
        "no relevant in some images": (rel, spu, y),
        "no spurious region": (rel, torch.zeros_like(spu), y),
        "duplicate labels only": (rel, spu, torch.full_like(y, 2)),
    }
    for name, (r, s, yy) in cases.items():
        for reduction in ("mean", "none"):
            got = _run(region_loss, x, t, yy, r, s, backend=backend, reduction=reduction)
            _assert_close(got, _ref(x, t, yy, r, s, reduction=reduction), torch.float32)
        assert (got[0][0][3:] == 0).all(), name
    # images outside H get no gradient (their relevant regions do not exist; padding regions never get one)
    _, (gx, _) = _run(region_loss, x, t, y, rel, torch.zeros_like(spu), backend=backend)
    assert (gx[3:] == 0).all() and (gx[pad] == 0).all()
    # all-padding batch: 0 loss, zero gradients, no NaN
    none = torch.zeros_like(rel)
    for reduction in ("mean", "sum", "none"):
        (loss, lr, la), (gx, gt) = _run(region_loss, torch.zeros_like(x), t, y, none, none, backend=backend,
                                        reduction=reduction)
        assert (loss == 0).all() and (lr == 0).all() and (la == 0).all()
        assert (gx == 0).all() and (gt == 0).all()
    # only spurious regions: no image in H, 0 loss, zero gradients
    (loss, _, _), (gx, gt) = _run(region_loss, x, t, y, none, spu, backend=backend)
    assert float(loss) == 0 and (gx == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_first_region_and_class(backend):
    """Exact ties (small dyadic values, normalize=False, tau = 1: every dot product exact): relevant regions 0 and 2
    of image 0 are equal, as are text rows 0 and 1. The gradient of m goes to region 0 only; the spurious regions'
    best match goes to class 0."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (3, 4, 16), generator=g).float() / 8
    t = torch.randint(-4, 5, (3, 16), generator=g).float() / 8
    x[0, 2] = x[0, 0]
    t[1] = t[0]
    rel = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    spu = torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    y = torch.tensor([0, 1, 2])
    kw = dict(normalize=False, temperature=1.0)
    got = _run(region_loss, x, t, y, rel, spu, backend=backend, **kw)
    _assert_close(got, _ref(x, t, y, rel, spu, **kw), torch.float32)
    gx = got[1][0]
    assert (gx[0, 2] == 0).all() and (gx[0, 0] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_spurious_wins(backend):
    x, t, y, rel, spu = _case(7, 4, 16, 3, seed=13)
    both = rel | spu  # every spurious region also flagged relevant
    got = _run(region_loss, x, t, y, both, spu, backend=backend)
    _assert_close(got, _ref(x, t, y, rel & ~spu, spu), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_many_image_chunks(backend, monkeypatch):
    monkeypatch.setattr(RL, "CHUNK_ELEMS", 3 * 4 * 10)  # 3 images per chunk, the last one short
    x, t, y, rel, spu = _case(17, 4, 16, 10, seed=17)
    _assert_close(_run(region_loss, x, t, y, rel, spu, backend=backend), _ref(x, t, y, rel, spu), torch.float32)


def test_triton_class_tiles_and_small_blocks():
    """Several class tiles (their best-class partials merged by torch) and several image blocks."""
    from vlmfast.kernels.region_loss import region_loss_stats

    x, t, y, rel, spu = _case(20, 3, 16, 40, seed=19)
    rn, tn = x / x.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    present = torch.zeros(40, dtype=torch.bool)
    present[y] = True
    want = RL._fwd_torch(rn, tn, rel & ~spu, spu, present, 10.0)
    got = region_loss_stats(rn, tn, rel & ~spu, spu, present, 10.0, block_i=16, block_c=16)
    for name, a, c in zip(("m", "am", "sl", "smax", "sarg"), got, want):
        if a.dtype == torch.int64:
            assert torch.equal(a, c), name
        else:
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Bad input, opcheck, compile
# ----------------------------------------------------------------------------------------------------------

_X, _T, _Y = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.tensor([0, 1])
_M = torch.zeros(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(2, 4), _T, _Y, _M, _M), {}, ValueError, r"regions: expected shape \(B, R, D\), got \(2, 4\)"),
        ((_X.double(), _T, _Y, _M, _M), {}, TypeError,
         "regions: expected float32, float16 or bfloat16, got torch.float64"),
        ((_X, torch.zeros(5, 3), _Y, _M, _M), {}, ValueError, r"text: expected shape \(C >= 1, 4\).*got \(5, 3\)"),
        ((_X, _T.int(), _Y, _M, _M), {}, TypeError, "text: expected float32, float16 or bfloat16, got torch.int32"),
        ((torch.zeros(0, 3, 4), _T, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.bool),
          torch.zeros(0, 3, dtype=torch.bool)), {}, ValueError, "regions: expected B, R, D >= 1"),
        ((_X, _T, _Y.float(), _M, _M), {}, TypeError, "labels: expected an integer dtype.*got torch.float32"),
        ((_X, _T, torch.tensor([0, 1, 2]), _M, _M), {}, ValueError, r"labels: expected shape \(2,\).*got \(3,\)"),
        ((_X, _T, [0, 1], _M, _M), {}, TypeError, "labels: expected an integer tensor.*got list"),
        ((_X, _T, _Y, _M.int(), _M), {}, TypeError, "relevant: expected dtype torch.bool, got torch.int32"),
        ((_X, _T, _Y, _M, torch.zeros(2, 4, dtype=torch.bool)), {}, ValueError,
         r"spurious: expected shape \(2, 3\).*got \(2, 4\)"),
        ((_X, _T, _Y, _M, _M), {"temperature": 0.0}, ValueError, "temperature: expected a finite value > 0, got 0.0"),
        ((_X, _T, _Y, _M, _M), {"temperature": -1}, ValueError, "temperature: expected a finite value > 0, got -1"),
        ((_X, _T, _Y, _M, _M), {"temperature": "0.1"}, TypeError, "temperature: expected a float, got str"),
        ((_X, _T, _Y, _M, _M), {"reduction": "max"}, ValueError,
         "reduction: expected 'mean', 'sum' or 'none', got 'max'"),
        ((_X, _T, _Y, _M, _M), {"normalize": 1}, TypeError, "normalize: expected a bool, got int"),
        ((_X, _T, torch.tensor([0, 5]), _M, _M), {}, ValueError,
         r"labels: expected values in \[0, 5\).*got 5 at image 1"),
        ((_X, _T, torch.tensor([-1, 0]), _M, _M), {}, ValueError,
         r"labels: expected values in \[0, 5\).*got -1 at image 0"),
        ((_X, _T, _Y, _M, _M), {"backend": "nope"}, ValueError, "nope"),
    ],
)
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        region_loss(*args, **kwargs)


def test_unvalidated_labels_are_clamped():
    x, t, _, rel, spu = _case(4, 3, 16, 3, seed=21)
    bad, clamped = torch.tensor([0, 7, -2, 1]), torch.tensor([0, 2, 0, 1])
    out = region_loss(x, t, bad, rel, spu, validate_args=False, backend="torch")
    torch.testing.assert_close(out.loss, region_loss(x, t, clamped, rel, spu, backend="torch").loss)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    x, t, y, rel, spu = _case(5, 3, 16, 4, seed=23)
    args = (x, t, y, rel, spu, 0.1, True, backend)
    torch.library.opcheck(torch.ops.vlmfast.region_loss.default, args)
    torch.library.opcheck(torch.ops.vlmfast.region_loss.default, (x, t, y, rel, spu, 0.5, False, backend))
    out = torch.ops.vlmfast.region_loss(*args)
    torch.library.opcheck(torch.ops.vlmfast.region_loss_backward.default,
                          (torch.ones(5), torch.full((5,), 0.5), x, t, y, rel, spu, *out[3:], 0.1, True, backend))


@pytest.mark.parametrize("backend", [None, "torch"])
def test_compiles_fullgraph_with_backward(backend):
    x, t, y, rel, spu = _case(7, 4, 16, 3, seed=29)

    def fn(x, t):
        out = region_loss(x, t, y, rel, spu, temperature=0.1, backend=backend)
        return out.loss + 0.5 * out.relevance_loss.sum()

    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    a1, b1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    a2, b2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    l1, l2 = compiled(a1, b1), fn(a2, b2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(torch.autograd.grad(l1, [a1, b1]), torch.autograd.grad(l2, [a2, b2]))


def test_nn_module_equals_the_functional():
    from vlmfast.nn import RegionLoss

    g = torch.Generator().manual_seed(7)
    regions = torch.randn(5, 3, 16, generator=g, requires_grad=True)
    text = torch.randn(4, 16, generator=g)
    labels = torch.tensor([0, 1, 1, 3, 2])
    relevant = torch.rand(5, 3, generator=g) > 0.3
    spurious = ~relevant & (torch.rand(5, 3, generator=g) > 0.5)
    mod = RegionLoss(temperature=0.1)
    got = mod(regions, text, labels, relevant, spurious)
    want = region_loss_ref(regions, text, labels, relevant, spurious, temperature=0.1).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "temperature=0.1" in repr(mod)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        RegionLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction: expected"):
        RegionLoss(reduction="max")
