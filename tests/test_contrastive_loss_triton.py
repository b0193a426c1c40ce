"""Triton kernels of contrastive_loss (vlmfast.kernels.contrastive_loss) under the interpreter (conftest sets
TRITON_INTERPRET=1): contrastive_lse / contrastive_cross / contrastive_grad against float64 torch formulas on the
materialised logits, for awkward B and D, scale 100 with bias 0 / -10 / +20, logits so negative that a
fixed-max shortcut would underflow, fp16/bf16 (and mixed) inputs against the float64 reference of the same 16-bit
values, non-contiguous inputs, several tiles per dimension (tile overrides), teacher on/off, float64 autograd of
the objective the gradient belongs to, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vlmfast.kernels import contrastive_loss as K  # noqa: E402

# Relative to the largest magnitude of the reference: the kernels compute in float32 from upcast inputs, so the
# 16-bit cases differ only by summation order too; the looser 16-bit bounds are the brief's margins.
TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# df/dg: z = scale cos carries ~1e-5 absolute float32 rounding at scale 100, which exp(z - lse) turns into ~1e-5
# relative error of every D entry (measured: ~5e-6 of the largest gradient entry); twice the fp32 bound.
GRAD_F32 = 2e-5


def _feats(B, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=gen), dim=-1).to(dtype)


def _s(v):
    return torch.tensor(float(v), dtype=torch.float32)


def _z(f, g, scale, bias=0.0):
    return float(scale) * (f.double() @ g.double().t()) + float(bias)


def _close(got, want, rel, name=""):
    want = want.double()
    got = got.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    atol = rel * max(float(want.abs().max()), 1e-30)
    torch.testing.assert_close(got, want, atol=atol, rtol=10 * rel, msg=lambda m: f"{name}: {m}")


def _ref_grad(f, g, scale, bias, alpha, beta, teacher=None):
    z = _z(f, g, scale, bias)
    lr, lc = z.logsumexp(1), z.logsumexp(0)
    d = alpha * ((z - lr[:, None]).exp() + (z - lc[None, :]).exp())
    if teacher is not None:
        tf, tg, ts = teacher
        zt = _z(tf, tg, ts)
        tlr, tlc = zt.logsumexp(1), zt.logsumexp(0)
        d = d - beta * ((zt - tlr[:, None]).exp() + (zt - tlc[None, :]).exp())
    cos = f.double() @ g.double().t()
    return scale * d @ g.double(), scale * d.t() @ f.double(), (d * cos).sum(), d.sum(), (lr, lc)


# ----------------------------------------------------------------------------------------------------------
# contrastive_lse
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 17, 97])
@pytest.mark.parametrize("D", [8, 40, 64])
@pytest.mark.parametrize("bias", [0.0, -10.0])
def test_lse_matches_float64(B, D, bias):
    f, g = _feats(B, D, seed=1), _feats(B, D, seed=2)
    lse_row, lse_col = K.contrastive_lse(f, g, _s(100.0), _s(bias))
    assert lse_row.dtype == lse_col.dtype == torch.float32
    z = _z(f, g, 100.0, bias)
    _close(lse_row, z.logsumexp(1), TOL[torch.float32], "lse_row")
    _close(lse_col, z.logsumexp(0), TOL[torch.float32], "lse_col")


def test_lse_strongly_negative_logits_do_not_underflow():
    # Every cosine is about -1: z ~ -110, so exp(z - scale) = exp(-210) underflows to 0 in float32 (a fixed
    # max = scale shortcut would give lse = -inf); the online maxima keep it finite and exact.
    B, D = 97, 32
    e = torch.zeros(B, D)
    e[:, 0] = 1.0
    f = F.normalize(e + 0.05 * _feats(B, D, seed=3), dim=-1)
    g = F.normalize(-e + 0.05 * _feats(B, D, seed=4), dim=-1)
    z = _z(f, g, 100.0, -10.0)
    assert float(z.max()) < -100.0
    assert float(torch.exp((z - 100.0).float()).sum()) == 0.0  # the shortcut's sum underflows
    lse_row, lse_col = K.contrastive_lse(f, g, _s(100.0), _s(-10.0), block_m=16, block_n=32)
    _close(lse_row, z.logsumexp(1), TOL[torch.float32], "lse_row")
    _close(lse_col, z.logsumexp(0), TOL[torch.float32], "lse_col")


def test_lse_several_tiles_and_moving_maxima():
    # Small tiles: 7 row blocks, 4 column blocks, 3 D chunks; rows sorted so that the row max moves to a later
    # column tile and must rescale the running sum.
    B, D = 97, 40
    f, g = _feats(B, D, seed=5), _feats(B, D, seed=6)
    g = g[torch.argsort((f @ g.t())[0])]  # the logits of row 0 increase along the columns
    z = _z(f, g, 100.0, 0.0)
    assert int(z[0].argmax()) == B - 1
    lse_row, lse_col = K.contrastive_lse(f, g, _s(100.0), _s(0.0), block_m=16, block_n=32, block_d=16)
    _close(lse_row, z.logsumexp(1), TOL[torch.float32], "lse_row")
    _close(lse_col, z.logsumexp(0), TOL[torch.float32], "lse_col")


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_lse_low_precision_inputs(dtypes):
    B, D = 97, 64
    f, g = _feats(B, D, dtypes[0], seed=7), _feats(B, D, dtypes[1], seed=8)
    lse_row, lse_col = K.contrastive_lse(f, g, _s(100.0), _s(-10.0))
    z = _z(f, g, 100.0, -10.0)  # from the same 16-bit values, upcast
    rel = max(TOL[dtypes[0]], TOL[dtypes[1]])
    _close(lse_row, z.logsumexp(1), rel, "lse_row")
    _close(lse_col, z.logsumexp(0), rel, "lse_col")


def test_lse_non_contiguous_inputs():
    B, D = 97, 40
    wide = torch.randn(B, 2 * D)
    f = wide[:, ::2]
    f.div_(f.norm(dim=-1, keepdim=True))
    g = _feats(B, D, seed=9).t().contiguous().t()  # a transposed copy: strides (1, B)
    assert not f.is_contiguous() and not g.is_contiguous()
    lse_row, lse_col = K.contrastive_lse(f, g, _s(100.0), _s(-10.0))
    z = _z(f, g, 100.0, -10.0)
    _close(lse_row, z.logsumexp(1), TOL[torch.float32], "lse_row")
    _close(lse_col, z.logsumexp(0), TOL[torch.float32], "lse_col")


# ----------------------------------------------------------------------------------------------------------
# contrastive_cross
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 17, 97])
@pytest.mark.parametrize("case", ["fp32", "bf16-teacher-noncontig", "fp16-student-small-tiles"])
def test_cross_matches_float64(B, case):
    D, DT = 40, 24
    f, g = _feats(B, D, seed=10), _feats(B, D, seed=11)
    tf, tg = _feats(B, DT, seed=12), _feats(B, DT, seed=13)
    rel = TOL[torch.float32]
    kw = {}
    if case == "bf16-teacher-noncontig":
        tf = tf.to(torch.bfloat16)
        tg = tg.t().contiguous().t()
        rel = TOL[torch.bfloat16]
    elif case == "fp16-student-small-tiles":
        f, g = f.half(), g.half()
        kw = dict(block_m=16, block_n=16, block_d=16)
        rel = TOL[torch.float16]
    z = _z(f, g, 100.0, -10.0)
    zt = _z(tf, tg, 30.0)
    tlr, tlc = zt.logsumexp(1), zt.logsumexp(0)
    x_row, x_col = K.contrastive_cross(f, g, _s(100.0), _s(-10.0), tf, tg, _s(30.0), tlr.float(), tlc.float(),
                                       **kw)
    assert x_row.dtype == x_col.dtype == torch.float32
    tlr32, tlc32 = tlr.float().double(), tlc.float().double()  # the kernel sees the float32-rounded lse
    _close(x_row, ((zt - tlr32[:, None]).exp() * z).sum(1), rel, "x_row")
    _close(x_col, ((zt - tlc32[None, :]).exp() * z).sum(0), rel, "x_col")


# ----------------------------------------------------------------------------------------------------------
# contrastive_grad
# ----------------------------------------------------------------------------------------------------------


def _run_grad(f, g, scale, bias, alpha, beta, teacher=None, **kw):
    _, _, _, _, (lr, lc) = _ref_grad(f, g, scale, bias, alpha, beta)
    args = [f, g, _s(scale), _s(bias), lr.float(), lc.float(), _s(alpha), _s(beta)]
    if teacher is not None:
        tf, tg, ts = teacher
        zt = _z(tf, tg, ts)
        args += [tf, tg, _s(ts), zt.logsumexp(1).float(), zt.logsumexp(0).float()]
    return K.contrastive_grad(*args, **kw)


def _assert_grad(got, want, rel):
    for name, a, b in zip(("df", "dg", "sum_dcos", "sum_d"), got, want):
        assert a.dtype == torch.float32, name
        if name.startswith("sum"):
            assert a.dim() == 0, name
            # sums over B^2 terms of both signs: bounded by the sum of magnitudes rather than by the result
            b = b.double()
            assert abs(float(a) - float(b)) <= rel * 10 * (abs(float(b)) + 1.0), f"{name}: {float(a)} vs {float(b)}"
        else:
            _close(a, b, rel, name)


@pytest.mark.parametrize("B", [1, 17, 97])
@pytest.mark.parametrize("D", [8, 64])
@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
def test_grad_matches_float64(B, D, teacher):
    f, g = _feats(B, D, seed=20), _feats(B, D, seed=21)
    tch = (_feats(B, 24, seed=22), _feats(B, 24, seed=23), 30.0) if teacher else None
    alpha, beta = 0.5 / B, 0.25 / B
    got = _run_grad(f, g, 100.0, -10.0, alpha, beta, tch)
    want = _ref_grad(f, g, 100.0, -10.0, alpha, beta, tch)[:4]
    _assert_grad(got, want, GRAD_F32)


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
def test_grad_several_tiles_and_output_chunks(teacher):
    # D = 40 with BLOCK_DO = 16: 3 output chunks (the last one partial); 16-row / 32-column tiles, 16-wide D steps;
    # bias +20: padded entries would overflow exp without their +inf lse.
    B, D = 97, 40
    f, g = _feats(B, D, seed=24), _feats(B, D, seed=25)
    tch = (_feats(B, 40, seed=26), _feats(B, 40, seed=27), 50.0) if teacher else None
    got = _run_grad(f, g, 100.0, 20.0, 0.01, 0.02, tch, block_m=16, block_n=32, block_d=16, block_do=16)
    want = _ref_grad(f, g, 100.0, 20.0, 0.01, 0.02, tch)[:4]
    _assert_grad(got, want, GRAD_F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_low_precision_and_mixed_teacher(dtype):
    B, D = 97, 64
    f, g = _feats(B, D, dtype, seed=30), _feats(B, D, dtype, seed=31)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float32
    tch = (_feats(B, 32, other, seed=32), _feats(B, 32, dtype, seed=33), 30.0)
    got = _run_grad(f, g, 100.0, -10.0, 0.005, 0.003, tch)
    want = _ref_grad(f, g, 100.0, -10.0, 0.005, 0.003, tch)[:4]  # from the 16-bit values, upcast
    _assert_grad(got, want, max(TOL[dtype], TOL[other]))


def test_grad_non_contiguous_inputs():
    B, D = 97, 40
    wide = torch.randn(B, 2 * D)
    f = wide[:, ::2]
    f.div_(f.norm(dim=-1, keepdim=True))
    g = _feats(B, D, seed=34).t().contiguous().t()
    tf = _feats(B, 2 * 24, seed=35)[:, 1::2]
    tf = tf / tf.norm(dim=-1, keepdim=True)
    tf = torch.empty_strided((B, 24), (1, B)).copy_(tf)  # column-major
    tg = _feats(B, 24, seed=36)
    tch = (tf, tg, 30.0)
    got = _run_grad(f, g, 100.0, -10.0, 0.005, 0.002, tch)
    want = _ref_grad(f.contiguous(), g.contiguous(), 100.0, -10.0, 0.005, 0.002, tch)[:4]
    _assert_grad(got, want, GRAD_F32)


def test_grad_is_the_autograd_of_the_objective():
    # L = alpha (sum lse_row + sum lse_col) - beta (sum x_row + sum x_col) with the teacher fixed: its gradients
    # with respect to f, g, scale and bias are (df, dg, sum_dcos, sum_d).
    B, D, DT = 33, 16, 16
    f, g = _feats(B, D, seed=40), _feats(B, D, seed=41)
    tf, tg = _feats(B, DT, seed=42), _feats(B, DT, seed=43)
    alpha, beta, ts = 0.7 / B, 0.3 / B, 20.0
    f64, g64 = f.double().requires_grad_(), g.double().requires_grad_()
    s64, b64 = torch.tensor(50.0, dtype=torch.float64, requires_grad=True), torch.tensor(
        -5.0, dtype=torch.float64, requires_grad=True)
    z = s64 * f64 @ g64.t() + b64
    zt = _z(tf, tg, ts)
    tlr, tlc = zt.logsumexp(1), zt.logsumexp(0)
    x_row = ((zt - tlr[:, None]).exp() * z).sum(1)
    x_col = ((zt - tlc[None, :]).exp() * z).sum(0)
    loss = alpha * (z.logsumexp(1).sum() + z.logsumexp(0).sum()) - beta * (x_row.sum() + x_col.sum())
    want = torch.autograd.grad(loss, (f64, g64, s64, b64))
    lse_row, lse_col = K.contrastive_lse(f, g, _s(50.0), _s(-5.0))
    got = K.contrastive_grad(f, g, _s(50.0), _s(-5.0), lse_row, lse_col, _s(alpha), _s(beta),
                             tf, tg, _s(ts), tlr.float(), tlc.float())
    _assert_grad(got, want, GRAD_F32)
    # and the forward pieces give the loss itself
    x_r, x_c = K.contrastive_cross(f, g, _s(50.0), _s(-5.0), tf, tg, _s(ts), tlr.float(), tlc.float())
    got_loss = alpha * (lse_row.sum() + lse_col.sum()) - beta * (x_r.sum() + x_c.sum())
    assert math.isclose(float(got_loss), float(loss.detach()), rel_tol=1e-5, abs_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Config and bad input
# ----------------------------------------------------------------------------------------------------------


def test_config_tiles():
    cpu = torch.device("cpu")
    for B, D in [(1, 1), (97, 40), (4096, 768)]:
        for interp in (True, False):
            cfg = K.contrastive_config(B, D, (torch.float32, torch.bfloat16), cpu, None, interpret=interp)
            for v in (cfg.block_m, cfg.block_n, cfg.block_d, cfg.block_do):
                assert v >= 16 and v & (v - 1) == 0
            assert cfg.precision == "ieee" and cfg.out_precision == "ieee"
    gpu = K.contrastive_config(4096, 768, (torch.bfloat16, torch.float16), cpu, (torch.bfloat16,) * 2,
                               interpret=False)
    assert gpu.precision == gpu.teacher_precision == "tf32"
    assert (gpu.block_n, gpu.block_d, gpu.block_do, gpu.num_warps) == (64, 64, 128, 4)
    interp = K.contrastive_config(4096, 768, (torch.bfloat16,) * 2, cpu, None, interpret=True)
    assert interp.precision == "ieee" and interp.num_stages == 1


def test_bad_input():
    f, g = _feats(8, 16), _feats(8, 16)
    s, b = _s(10.0), _s(0.0)
    with pytest.raises(ValueError):
        K.contrastive_lse(f, g[:7], s, b)
    with pytest.raises(ValueError):
        K.contrastive_lse(f[0], g, s, b)
    with pytest.raises(TypeError):
        K.contrastive_lse(f.double(), g, s, b)
    with pytest.raises(ValueError):
        K.contrastive_lse(f, g, torch.ones(2), b)
    lr, lc = K.contrastive_lse(f, g, s, b)
    with pytest.raises(ValueError, match="teacher"):
        K.contrastive_grad(f, g, s, b, lr, lc, _s(1.0), _s(1.0), tf=f)
    with pytest.raises(ValueError):
        K.contrastive_grad(f, g, s, b, lr[:7], lc, _s(1.0), _s(1.0))
    with pytest.raises(ValueError):
        K.contrastive_cross(f, g, s, b, _feats(9, 16), _feats(9, 16), s, lr, lc)
