"""The op contrastive_loss: every backend against autograd through the materialised formula (values and gradients
of features, scale and bias) on awkward shapes and dtypes, with labels, label smoothing and a teacher; open_clip's
ClipLoss; the online max at scale 100; chunking; bad input; opcheck and compile."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmfast.ops.contrastive_loss as CL
from tests._tolerances import tol
from vlmfast.functional import clip_loss, clip_loss_ref
from vlmfast.losses import DistillClipLoss
from vlmfast.nn import ClipLoss

COMPILE_BACKEND = "aot_eager"
BACKENDS = ["torch", "cpp", "triton"]  # triton runs CPU tensors under the interpreter (forced)
SHAPES = [(1, 64), (97, 512), (1023, 64), (33, 768)]
TRITON_SHAPES = [(1, 64), (97, 32), (40, 130)]


def _case(B, D, dtype=torch.float32, seed=0, teacher=False):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(B, D, generator=g) * 3).to(dtype)
    t = (f.float() + torch.randn(B, D, generator=g) * 10).to(dtype)  # weakly correlated pairs: a loss far from 0
    out = [f, t]
    if teacher:
        out += [(f.float() + torch.randn(B, D, generator=g)).to(dtype), (t.float() + torch.randn(B, D, generator=g)).to(dtype)]
    return out


def _params(all_shapes, triton_shapes):
    return [pytest.param(b, s, id=f"{b}-{s[0]}x{s[1]}") for b in BACKENDS
            for s in (triton_shapes if b == "triton" else all_shapes)]


def _run(fn, f, g, s, b, **kw):
    """Loss (+ distill) and the gradients of contrastive + 1.5 distill wrt (f, g, s, b)."""
    leaves = [f.detach().clone().requires_grad_(), g.detach().clone().requires_grad_(),
              s.detach().clone().requires_grad_()] + ([b.detach().clone().requires_grad_()] if b is not None else [])
    out = fn(leaves[0], leaves[1], leaves[2], logit_bias=leaves[3] if b is not None else None, **kw)
    losses = out if isinstance(out, tuple) else (out,)
    total = losses[0] + (1.5 * losses[1] if len(losses) > 1 else 0)
    return [x.detach() for x in losses], torch.autograd.grad(total, leaves)


def _ref(f, g, s, b, **kw):
    up = lambda t: t.float() if t is not None else None  # noqa: E731
    if kw.get("teacher") is not None:
        tf, tg, ts = kw["teacher"]
        kw = {**kw, "teacher": (tf.float(), tg.float(), ts)}
    return _run(clip_loss_ref, up(f), up(g), s, up(b), **kw)


def _assert_close(got, want, dtype, logit_mag=10.0):
    """Losses: the loss is a difference of LSEs and target logits of size ~``logit_mag`` (the scale), so its
    absolute rounding grows with it: atol scales with max(1, logit_mag / 10)."""
    (gl, gg), (wl, wg) = got, want
    assert len(gl) == len(wl)
    atol, rtol = tol("contrastive_loss", dtype, "loss").values()
    for a, c in zip(gl, wl):
        torch.testing.assert_close(a, c, atol=atol * max(1.0, logit_mag / 10), rtol=rtol)
    atol, rtol = tol("contrastive_loss", dtype, "grad").values()
    for name, a, c in zip(("df", "dg", "dscale", "dbias"), gg, wg):
        assert a.dtype == (dtype if name in ("df", "dg") else c.dtype), name
        scale = float(c.abs().max()) or 1.0
        if name in ("df", "dg"):  # the logits' own rounding (a few ulp of ``logit_mag``) times the scale reaches
            scale = max(scale, logit_mag / 10)  # the gradient even where it is 0 exactly (B = 1: p = y)
        if name == "dbias":  # 0 in exact arithmetic: a sum of B^2 terms whose absolute sum is ~2 per unit of
            scale = max(scale, 5.0)  # upstream gradient (1 + 1.5 here): its rounding, not its size, is the bound
        torch.testing.assert_close(a.float(), c, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,shape", _params(SHAPES, TRITON_SHAPES))
@pytest.mark.parametrize("eps,labels,bias", [(0.0, False, False), (0.1, True, True)])
def test_values_and_gradients_match_autograd(backend, shape, eps, labels, bias):
    B, D = shape
    f, g = _case(B, D, seed=B)
    y = torch.randint(0, max(1, B // 4), (B,), generator=torch.Generator().manual_seed(1)) if labels else None
    s = torch.tensor(31.0)
    b = torch.tensor(-3.0) if bias else None
    got = _run(clip_loss, f, g, s, b, label_smoothing=eps, labels=y, backend=backend)
    want = _ref(f, g, s, b, label_smoothing=eps, labels=y)
    _assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,shape", _params([(97, 64), (1, 16), (300, 40)], [(17, 32), (1, 16)]))
def test_teacher_self_distillation(backend, shape):
    B, D = shape
    f, g, tf, tg = _case(B, D, seed=3, teacher=True)
    s, ts = torch.tensor(100.0), torch.tensor(60.0)
    teacher = (tf, tg, ts)
    got = _run(clip_loss, f, g, s, None, teacher=teacher, label_smoothing=0.05, backend=backend)
    want = _ref(f, g, s, None, teacher=teacher, label_smoothing=0.05)
    _assert_close(got, want, torch.float32, logit_mag=100.0)
    # the teacher gets no gradient
    tf2 = tf.clone().requires_grad_()
    f2 = f.clone().requires_grad_()
    c, d = clip_loss(f2, g, s, teacher=(tf2, tg, ts), backend=backend)
    (c + d).backward()
    assert tf2.grad is None and f2.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    f, g, tf, tg = _case(37, 48, dtype=dtype, seed=5, teacher=True)
    s = torch.tensor(50.0)
    for teacher in (None, (tf, tg, torch.tensor(40.0))):
        got = _run(clip_loss, f, g, s, None, teacher=teacher, backend=backend)
        want = _ref(f, g, s, None, teacher=teacher)
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend):
    f, g = _case(29, 64, seed=7)
    wide = torch.cat([f, f], dim=1)[:, ::2]  # stride 2 columns
    gt = g.t().contiguous().t()  # column-major
    assert not wide.is_contiguous() and not gt.is_contiguous()
    s = torch.tensor(20.0)
    got = _run(clip_loss, wide, gt.half(), s, None, backend=backend)
    want = _ref(wide, gt.half(), s, None)
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl[0], wl[0], **tol("contrastive_loss", torch.float16, "loss"))
    for a, c in zip(gg[:1] + gg[2:], wg[:1] + wg[2:]):  # df (float32), dscale
        torch.testing.assert_close(a.float(), c, atol=1e-3 * float(c.abs().max()), rtol=2e-3)
    torch.testing.assert_close(gg[1].float(), wg[1], atol=1e-3 * float(wg[1].abs().max()), rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_max_at_scale_100(backend):
    """Every logit far below the scale (cos ~ -1 for most pairs and a bias of -200): a fixed max = s shortcut
    would give exp(S - s) = 0 everywhere (log 0); the online max keeps the loss finite and exact."""
    B, D = 24, 32
    gen = torch.Generator().manual_seed(2)
    base = F.normalize(torch.randn(1, D, generator=gen), dim=-1)
    f = base + 0.05 * torch.randn(B, D, generator=gen)
    g = -base + 0.05 * torch.randn(B, D, generator=gen)
    s, b = torch.tensor(100.0), torch.tensor(-200.0)
    got = _run(clip_loss, f, g, s, b, backend=backend)
    want = _ref(f, g, s, b)
    assert math.isfinite(float(got[0][0]))
    _assert_close(got, want, torch.float32, logit_mag=300.0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_many_row_chunks(backend, monkeypatch):
    monkeypatch.setattr(CL, "CHUNK_ELEMS", 7 * 61)  # 7 rows per chunk, the last one short
    f, g, tf, tg = _case(61, 24, seed=11, teacher=True)
    y = torch.arange(61) % 5
    s = torch.tensor(25.0)
    kw = dict(teacher=(tf, tg, torch.tensor(30.0)), labels=y, label_smoothing=0.2)
    _assert_close(_run(clip_loss, f, g, s, torch.tensor(1.0), backend=backend, **kw),
                  _ref(f, g, s, torch.tensor(1.0), **kw), torch.float32)


@pytest.mark.parametrize("bias", [None, 0.7])
@pytest.mark.parametrize("output_dict", [False, True])
def test_module_matches_open_clip(bias, output_dict):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    f, g = _case(64, 32, seed=13)
    f, g = F.normalize(f, dim=-1), F.normalize(g, dim=-1)

    def run(mod):
        a, c = f.clone().requires_grad_(), g.clone().requires_grad_()
        ls = torch.tensor(math.log(30.0), requires_grad=True)
        bb = torch.tensor(bias, requires_grad=True) if bias is not None else None
        out = mod(a, c, ls.exp(), bb, output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        return loss.detach(), torch.autograd.grad(loss, [a, c, ls])

    (ref, rg), (got, gg) = run(open_clip_loss.ClipLoss()), run(ClipLoss())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, c in zip(gg, rg):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # the functional normalises inside: unnormalised inputs give the same loss as open_clip on normalised ones
    torch.testing.assert_close(clip_loss(3 * f, 0.5 * g, 30.0, logit_bias=bias), ref, rtol=1e-5, atol=1e-6)


def test_distill_module_against_open_clip_and_carot_sum():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    f, g, tf, tg = [F.normalize(t, dim=-1) for t in _case(40, 16, seed=17, teacher=True)]
    ref_c, ref_d = open_clip_loss.DistillClipLoss()(f, g, torch.tensor(20.0), tf, tg, torch.tensor(15.0))
    c, d = DistillClipLoss(directions="mean")(f, g, torch.tensor(20.0), tf, tg, torch.tensor(15.0))
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-6)
    out = DistillClipLoss()(f, g, torch.tensor(20.0), tf, tg, torch.tensor(15.0), output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    torch.testing.assert_close(out["distill_loss"], 2 * ref_d, rtol=1e-5, atol=1e-6)  # CaRot: summed directions


def test_hand_computed_two_pairs():
    """B = 2, D = 2: cos matrix [[1, 0], [0, 1]] at s = 2: each CE = log(1 + e^-2)."""
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = clip_loss(f, f * 5, 2.0, backend="torch")
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(3, 4), torch.zeros(4, 4), 1.0), {}, ValueError, r"same shape.*\(3, 4\) and \(4, 4\)"),
        ((torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4), 1.0), {}, TypeError,
         "image_features: expected float32, float16 or bfloat16, got torch.float64"),
        ((torch.zeros(0, 4), torch.zeros(0, 4), 1.0), {}, ValueError, "B, D >= 1"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2)), {}, ValueError, "logit_scale: expected a one-element"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"label_smoothing": 1.5}, ValueError, r"label_smoothing.*\[0, 1\]"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"labels": torch.zeros(3)}, TypeError, "labels: expected an integer"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"teacher": (torch.zeros(3, 4), torch.zeros(3, 4))}, TypeError,
         "teacher: expected .* of length 2"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"teacher": (torch.zeros(2, 4), torch.zeros(2, 4), 1.0)},
         ValueError, r"teacher\[0\].*expected 3 rows"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"normalize": 1}, TypeError, "normalize: expected a bool"),
        ((torch.zeros(3, 4), torch.zeros(3, 4), 1.0), {"backend": "nope"}, ValueError, "nope"),
    ],
)
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        clip_loss(*args, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    f, g, tf, tg = _case(5, 8, seed=19, teacher=True)
    s, b, ts = torch.tensor(4.0), torch.tensor(0.5), torch.tensor(3.0)
    y = torch.tensor([0, 1, 0, 2, 1])
    torch.library.opcheck(torch.ops.vlmfast.contrastive_loss.default, (f, g, s, b, y, tf, tg, ts, 0.1, True, backend))
    torch.library.opcheck(torch.ops.vlmfast.contrastive_loss.default, (f, g, s, None, None, None, None, None, 0.0,
                                                                       False, backend))
    out = torch.ops.vlmfast.contrastive_loss(f, g, s, b, y, tf, tg, ts, 0.1, True, backend)
    torch.library.opcheck(torch.ops.vlmfast.contrastive_loss_backward.default,
                          (torch.tensor(1.0), torch.tensor(0.5), f, g, s, b, y, tf, tg, ts, *out[2:], 0.1, True,
                           backend))


@pytest.mark.parametrize("backend", [None, "torch"])
def test_compiles_fullgraph_with_backward(backend):
    f, g, tf, tg = _case(11, 16, seed=23, teacher=True)

    def fn(f, g, s):
        c, d = clip_loss(f, g, s, teacher=(tf, tg, 7.0), label_smoothing=0.1, backend=backend)
        return c + 1.5 * d

    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    leaves = [t.clone().requires_grad_() for t in (f, g, torch.tensor(5.0))]
    leaves2 = [t.clone().requires_grad_() for t in (f, g, torch.tensor(5.0))]
    a, b = compiled(*leaves), fn(*leaves2)
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a, leaves), torch.autograd.grad(b, leaves2)):
        torch.testing.assert_close(ga, gb)
