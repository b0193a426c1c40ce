"""The op prompt_logits: every backend against autograd through F.normalize / F.cross_entropy (values and gradients)
on awkward shapes and dtypes; a hand-computed case; bad input; opcheck and compile; and calibration_from_features
against calibration on the materialised logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests._tolerances import tol
from vlmfast import BackendError
from vlmfast.functional import PromptLogitsLoss, prompt_logits, prompt_logits_loss, prompt_logits_ref
from vlmfast.metrics import calibration, calibration_from_features

COMPILE_BACKEND = "aot_eager"
BACKENDS = ["torch", "cpp", "triton"]  # triton runs CPU tensors under the interpreter (forced)

# (N, C, D): the awkward sizes; the interpreter is slow, so Triton gets a subset
SHAPES = [(1, 2, 64), (97, 1023, 64), (97, 1000, 512), (1, 1023, 768), (33, 2, 768)]
TRITON_SHAPES = [(1, 2, 64), (97, 1023, 64), (17, 130, 768)]


def _case(N, C, D, dtype=torch.float32, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, D, generator=g) * 3).to(dtype)
    w = (torch.randn(C, D, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    if ignore and N > 2:
        y[1] = -100
    return x, w, y


def _ref_and_grads(x, w, s, y, eps, reduction="mean"):
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    sr = s.detach().clone().requires_grad_()
    loss = prompt_logits_ref(xr, wr, sr, y, label_smoothing=eps, reduction=reduction)
    gs = torch.autograd.grad(loss.sum(), (xr, wr, sr))
    return loss.detach(), gs


def _assert_grads(got, want, dtype):
    atol, rtol = tol("prompt_logits", dtype, "grad").values()
    for name, a, b in zip(("dx", "dw", "dscale"), got, want):
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a.float(), b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _backend_params(shapes_all, shapes_triton):
    out = []
    for b in BACKENDS:
        for shape in (shapes_triton if b == "triton" else shapes_all):
            out.append(pytest.param(b, shape, id=f"{b}-{'x'.join(map(str, shape))}"))
    return out


@pytest.mark.parametrize("backend,shape", _backend_params(SHAPES, TRITON_SHAPES))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_values_and_gradients_match_autograd_fp32(backend, shape, eps):
    x, w, y = _case(*shape)
    x.requires_grad_()
    w.requires_grad_()
    s = torch.tensor(31.0, requires_grad=True)
    out = prompt_logits(x, w, s, y, label_smoothing=eps, backend=backend)
    want, want_g = _ref_and_grads(x, w, s, y, eps)
    torch.testing.assert_close(out.loss.detach(), want, **tol("prompt_logits", torch.float32, "loss"))
    got_g = torch.autograd.grad(out.loss, (x, w, s))
    _assert_grads(got_g, want_g, torch.float32)
    z = s.detach() * F.normalize(x.detach(), dim=-1) @ F.normalize(w.detach(), dim=-1).t()
    torch.testing.assert_close(out.lse, torch.logsumexp(z, 1), **tol("prompt_logits", torch.float32, "stats"))
    torch.testing.assert_close(out.confidence, torch.softmax(z, 1).max(1).values,
                               **tol("prompt_logits", torch.float32, "stats"))
    assert torch.equal(out.prediction, z.argmax(1))
    assert torch.equal(out.correct, z.argmax(1) == y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    x, w, y = _case(97, 1023 if backend != "triton" else 130, 64, dtype=dtype)
    x.requires_grad_()
    w.requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)
    out = prompt_logits(x, w, s, y, label_smoothing=0.1, backend=backend)
    want, want_g = _ref_and_grads(x, w, s, y, 0.1)
    torch.testing.assert_close(out.loss.detach(), want, **tol("prompt_logits", dtype, "loss"))
    got_g = torch.autograd.grad(out.loss, (x, w, s))
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    _assert_grads(got_g, want_g, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_no_labels_and_frozen_parts(backend):
    g = torch.Generator().manual_seed(3)
    big_x = torch.randn(40, 2 * 96, generator=g)
    x = big_x[:, ::2]  # strided rows and columns
    w = torch.randn(96, 70, generator=g).t()  # (70, 96) transposed view
    assert not x.is_contiguous() and not w.is_contiguous()
    w = w.clone().t().t().requires_grad_() if False else w.detach().requires_grad_()
    y = torch.randint(0, 70, (40,), generator=g)
    loss = prompt_logits_loss(x, w, 14.0, y, backend=backend)  # float scale, frozen image features (CoOp)
    (dw,) = torch.autograd.grad(loss, (w,))
    wr = w.detach().clone().requires_grad_()
    ref = F.cross_entropy(14.0 * F.normalize(x, dim=-1) @ F.normalize(wr, dim=-1).t(), y)
    (dwr,) = torch.autograd.grad(ref, (wr,))
    torch.testing.assert_close(loss.detach(), ref.detach(), **tol("prompt_logits", torch.float32, "loss"))
    torch.testing.assert_close(dw, dwr, atol=2e-5 * float(dwr.abs().max()), rtol=1e-4)
    stats = prompt_logits(x, w.detach(), 14.0, None, backend=backend)  # no labels: statistics only
    z = 14.0 * F.normalize(x, dim=-1) @ F.normalize(w.detach(), dim=-1).t()
    assert torch.equal(stats.prediction, z.argmax(1))
    assert not stats.correct.any()
    assert float(stats.loss.detach()) != float(stats.loss.detach())  # mean over no labelled rows is NaN


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_ignored_rows(backend, reduction):
    x, w, y = _case(9, 5, 16)
    y[4] = -100
    x.requires_grad_()
    out = prompt_logits_loss(x, w, 7.0, y, reduction=reduction, backend=backend)
    want = prompt_logits_ref(x.detach(), w, 7.0, y, reduction=reduction)
    torch.testing.assert_close(out.detach(), want, **tol("prompt_logits", torch.float32, "loss"))
    (dx,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.all(dx[1] == 0) and torch.all(dx[4] == 0)  # ignored rows get no gradient
    assert dx[0].abs().sum() > 0
    if reduction == "none":
        assert out.shape == (9,) and float(out.detach()[1]) == 0.0


def test_hand_computed_case():
    # x = e0, w = (e0, e1), s = 2: z = (2, 0); loss = log(1 + e^-2); dL/ds = dz . cos = (p0 - 1) * 1
    x = torch.tensor([[3.0, 0.0]], requires_grad=True)
    w = torch.tensor([[5.0, 0.0], [0.0, 0.5]])
    s = torch.tensor(2.0, requires_grad=True)
    for backend in ("torch", "cpp"):
        out = prompt_logits(x, w, s, torch.tensor([0]), backend=backend)
        assert math.isclose(float(out.loss), math.log1p(math.exp(-2.0)), rel_tol=1e-6)
        assert math.isclose(float(out.confidence), 1 / (1 + math.exp(-2.0)), rel_tol=1e-6)
        (ds,) = torch.autograd.grad(out.loss, (s,))
        assert math.isclose(float(ds), 1 / (1 + math.exp(-2.0)) - 1, rel_tol=1e-5)


def test_zero_vector_follows_normalize_clamp():
    x = torch.zeros(2, 8)
    x[1, 3] = 1.0
    x.requires_grad_()
    w = torch.randn(4, 8)
    y = torch.tensor([0, 2])
    for backend in ("torch", "cpp"):
        (dx,) = torch.autograd.grad(prompt_logits_loss(x, w, 10.0, y, backend=backend), (x,))
        xr = x.detach().clone().requires_grad_()
        (dxr,) = torch.autograd.grad(prompt_logits_ref(xr, w, 10.0, y), (xr,))
        torch.testing.assert_close(dx, dxr, atol=1e-3 * float(dxr.abs().max()), rtol=1e-4)


def test_bad_inputs():
    x, w, y = _case(4, 3, 8)
    with pytest.raises(ValueError, match=r"text_features: expected feature width D = 8"):
        prompt_logits_loss(x, torch.randn(3, 5), 1.0, y)
    with pytest.raises(TypeError, match="image_features: expected float32, float16 or bfloat16"):
        prompt_logits_loss(x.long(), w, 1.0, y)
    with pytest.raises(ValueError, match=r"image_features: expected shape \(rows, D\)"):
        prompt_logits_loss(x[0], w, 1.0, y)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\).*got 7 at sample 2"):
        prompt_logits_loss(x, w, 1.0, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        prompt_logits_loss(x, w, 1.0, y[:3])
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        prompt_logits_loss(x, w, 1.0, y.float())
    with pytest.raises(ValueError, match="logit_scale: expected a one-element float tensor"):
        prompt_logits_loss(x, w, torch.ones(2), y)
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 1\]"):
        prompt_logits_loss(x, w, 1.0, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        prompt_logits_loss(x, w, 1.0, y, reduction="avg")
    with pytest.raises(ValueError, match="image_features/text_features: expected N, C, D >= 1"):
        prompt_logits_loss(x[:0], w, 1.0, y[:0])
    with pytest.raises(ValueError, match="labels: expected \\(N,\\) class ids"):
        prompt_logits_loss(x, w, 1.0, None)
    with pytest.raises(BackendError):
        prompt_logits_loss(x, w, 1.0, y, backend="cuda")  # no CUDA tensors here
    # unchecked labels are ignored rows, not a crash
    out = prompt_logits_loss(x, w, 1.0, torch.tensor([0, 1, 7, 2]), validate_args=False, reduction="none")
    assert float(out[2]) == 0.0


def test_module_form():
    x, w, y = _case(6, 4, 8)
    m = PromptLogitsLoss(label_smoothing=0.2, backend="torch")
    assert "label_smoothing=0.2" in repr(m)
    torch.testing.assert_close(m(x, w, 3.0, y), prompt_logits_ref(x, w, 3.0, y, label_smoothing=0.2),
                               **tol("prompt_logits", torch.float32, "loss"))
    with pytest.raises(ValueError, match="reduction"):
        PromptLogitsLoss(reduction="x")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    x, w, y = _case(5, 7, 16)
    s = torch.tensor(4.0)
    torch.library.opcheck(torch.ops.vlmfast.prompt_logits.default, (x, w, s, y, 0.1, -100, backend))
    lse = prompt_logits(x, w, s, y, backend=backend).lse
    torch.library.opcheck(torch.ops.vlmfast.prompt_logits_backward.default,
                          (torch.rand(5), x, w, s, y, lse, 0.1, -100, backend))


@pytest.mark.parametrize("backend", [None, "cpp"])
def test_compiles_fullgraph_with_backward(backend):
    x, w, y = _case(11, 9, 16)

    def f(x, w, s, y):
        return prompt_logits_loss(x, w, s, y, label_smoothing=0.1, backend=backend, validate_args=False)

    compiled = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)
    leaves = [t.clone().requires_grad_() for t in (x, w, torch.tensor(5.0))]
    leaves2 = [t.clone().requires_grad_() for t in (x, w, torch.tensor(5.0))]
    a = compiled(*leaves, y)
    b = f(*leaves2, y)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a, leaves), torch.autograd.grad(b, leaves2)):
        torch.testing.assert_close(ga, gb)


# ----------------------------------------------------------------------------------------------------------
# calibration_from_features: M heads on one backbone, the logits never materialised
# ----------------------------------------------------------------------------------------------------------


def _heads(M=6, N=301, C=13, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(M, C, D, generator=g)
    s = torch.rand(M, generator=g) * 30 + 5
    y = torch.randint(0, C, (N,), generator=g)
    return x, w, s, y


def _materialised(x, w, s):
    xn = F.normalize(x, dim=-1)
    if xn.dim() == 2:
        xn = xn.unsqueeze(0).expand(w.shape[0], -1, -1)
    return s.view(-1, 1, 1) * torch.bmm(xn, F.normalize(w, dim=-1).transpose(1, 2))


def _assert_same_result(a, b):
    for k in a.metric_names:
        torch.testing.assert_close(getattr(b, k), getattr(a, k), atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")
    assert torch.equal(a.bin_count, b.bin_count)


@pytest.mark.parametrize("chunk_elems", [1 << 22, 500, 7])
@pytest.mark.parametrize("convention,binning", [("standard", "width"), ("dac", "width"), ("standard", "mass")])
def test_calibration_from_features_equals_materialised(chunk_elems, convention, binning):
    x, w, s, y = _heads()
    want = calibration(_materialised(x, w, s), y, 10, convention=convention, binning=binning)
    got = calibration_from_features(x, w, s, y, 10, convention=convention, binning=binning, chunk_elems=chunk_elems)
    _assert_same_result(want, got)


def test_calibration_from_features_per_head_features_one_head_and_scalar_scale():
    x, w, s, y = _heads(M=3)
    xs = torch.randn(3, *x.shape)
    _assert_same_result(calibration(_materialised(xs, w, s), y, 15),
                        calibration_from_features(xs, w, s, y, 15, chunk_elems=100))
    one = calibration_from_features(x, w[1], s[1], y, 15)
    ref = calibration(_materialised(x, w[1:2], s[1:2])[0], y, 15)
    assert one.ece.dim() == 0
    _assert_same_result(ref, one)
    shared = calibration_from_features(x, w, 20.0, y, 15)
    _assert_same_result(calibration(_materialised(x, w, torch.full((3,), 20.0)), y, 15), shared)


def test_calibration_from_features_bad_inputs():
    x, w, s, y = _heads(M=2)
    with pytest.raises(ValueError, match=r"image_features: expected shape \(N, 32\) or \(2, N, 32\)"):
        calibration_from_features(x[:, :5], w, s, y)
    with pytest.raises(ValueError, match=r"logit_scale: expected a scalar or shape \(2,\)"):
        calibration_from_features(x, w, torch.ones(3), y)
    with pytest.raises(ValueError, match=r"labels: expected shape \(301,\)"):
        calibration_from_features(x, w, s, y[:3])
    with pytest.raises(ValueError, match=r"head_weights: expected shape \(C, D\) or \(M, C, D\)"):
        calibration_from_features(x, w[0, 0], s, y)
    with pytest.raises(ValueError, match="labels: expected values in"):
        calibration_from_features(x, w, s, torch.full_like(y, 99))
