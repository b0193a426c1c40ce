"""The C++ chunk kernels of the contrastive loss (vlmfast._C.contrastive_lse_rows / contrastive_cross_rows /
contrastive_grad_rows), called directly, against float64 torch formulas on the materialised logits: one chunk and
several uneven chunks accumulating the column statistics, strided rows, scale 100 with bias 0 / -10, thread
independence (bit-identical), D in place and its sums, NaN propagation, empty inputs and bad arguments."""

import math

import pytest
import torch

from vlmfast._C_loader import get_C, tensor_view

C = get_C()
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "contrastive_lse_rows"),
                                reason="vlmfast._C without the contrastive_loss kernels")

SHAPES = [(1, 1), (1, 97), (97, 97), (33, 1023)]
RTOL = 2e-6  # relative to the magnitude of the quantity (|lse| is ~ |z| here)


def tv(t):
    return tensor_view(t)


def _cos(R, B, seed, wide=0):
    """Cosines uniform in [-1, 1]; with wide > 0 a column slice of a wider tensor (row stride B + wide)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(R, B + wide, generator=g) * 2 - 1
    return full[:, wide // 2: wide // 2 + B] if wide else full


def _chunks(R, n):
    """n uneven consecutive row ranges covering 0..R (fewer when R is small)."""
    if R < n:
        return [(0, R)]
    cuts = sorted({0, R, *[max(1, min(R - 1, round(R * f))) for f in (0.17, 0.58)][: n - 1]})
    return list(zip(cuts[:-1], cuts[1:]))


def _ref_z(c, scale, bias):
    return scale * c.double() + bias


def _run_lse(c, scale, bias, chunks, nt=0):
    R, B = c.shape
    lse_row = torch.empty(R)
    cmax = torch.full((B,), -math.inf)
    csum = torch.zeros(B)
    for r0, r1 in chunks:
        C.contrastive_lse_rows(tv(c[r0:r1]), scale, bias, tv(lse_row[r0:r1]), tv(cmax), tv(csum), nt)
    return lse_row, cmax, csum


def _close(got, want, rtol=RTOL, what=""):
    got = got.double()
    mag = want.abs().max().clamp_min(1.0)
    err = (got - want).abs().max() / mag
    assert err <= rtol, f"{what}: relative error {float(err):.3g} > {rtol}"


@pytest.mark.parametrize("R,B", SHAPES)
@pytest.mark.parametrize("bias", [0.0, -10.0])
@pytest.mark.parametrize("scale", [100.0, 3.5])
def test_lse_rows_and_columns_match_float64(R, B, bias, scale):
    c = _cos(R, B, seed=R * 7 + B)
    z = _ref_z(c, scale, bias)
    want_row, want_col = torch.logsumexp(z, 1), torch.logsumexp(z, 0)
    for chunks in ([(0, R)], _chunks(R, 3)):
        lse_row, cmax, csum = _run_lse(c, scale, bias, chunks)
        _close(lse_row, want_row, what="lse_row")
        _close(cmax.double() + csum.double().log(), want_col, what="lse_col")


@pytest.mark.parametrize("R,B", [(97, 97), (33, 1023)])
def test_strided_rows_and_thread_independence(R, B):
    c = _cos(R, B, seed=5, wide=13)
    assert not c.is_contiguous() and c.stride(0) == B + 13
    z = _ref_z(c, 100.0, -10.0)
    chunks = _chunks(R, 3)
    outs = [_run_lse(c, 100.0, -10.0, chunks, nt) for nt in (1, 2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    lse_row, cmax, csum = outs[0]
    _close(lse_row, torch.logsumexp(z, 1), what="lse_row")
    _close(cmax.double() + csum.double().log(), torch.logsumexp(z, 0), what="lse_col")
    # a contiguous copy gives the same bits
    for a, b in zip(outs[0], _run_lse(c.contiguous(), 100.0, -10.0, chunks, 1)):
        assert torch.equal(a, b)


def test_large_row_and_many_column_blocks():
    R, B = 24, 4096  # long rows (|z| <= 100), 64 column blocks, two threads
    c = _cos(R, B, seed=11)
    z = _ref_z(c, 100.0, 0.0)
    outs = [_run_lse(c, 100.0, 0.0, _chunks(R, 3), nt) for nt in (1, 2)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    lse_row, cmax, csum = outs[0]
    _close(lse_row, torch.logsumexp(z, 1), what="lse_row")
    _close(cmax.double() + csum.double().log(), torch.logsumexp(z, 0), what="lse_col")
    # small scale: the sum of 4096 comparable terms, where float32 summation error would show
    z = _ref_z(c, 1.0, 0.0)
    lse_row, cmax, csum = _run_lse(c, 1.0, 0.0, _chunks(R, 3), 2)
    _close(lse_row, torch.logsumexp(z, 1), rtol=1e-6, what="lse_row scale 1")
    _close(cmax.double() + csum.double().log(), torch.logsumexp(z, 0), rtol=1e-6, what="lse_col scale 1")


def _teacher(R, B, seed, tscale):
    ct = _cos(R, B, seed=seed + 1000)
    zt = tscale * ct.double()
    return ct, zt, torch.logsumexp(zt, 1).float(), torch.logsumexp(zt, 0).float()


def _run_cross(c, scale, bias, ct, tscale, tl_row, tl_col, chunks, nt=0):
    R, B = c.shape
    x_row = torch.full((R,), float("nan"))
    x_col = torch.zeros(B)
    for r0, r1 in chunks:
        C.contrastive_cross_rows(tv(c[r0:r1]), scale, bias, tv(ct[r0:r1]), tscale, tv(tl_row[r0:r1]), tv(tl_col),
                                 tv(x_row[r0:r1]), tv(x_col), nt)
    return x_row, x_col


@pytest.mark.parametrize("R,B", SHAPES)
@pytest.mark.parametrize("bias", [0.0, -10.0])
def test_cross_rows_match_float64(R, B, bias):
    c = _cos(R, B, seed=R + 3 * B, wide=5)
    ct, zt, tl_row, tl_col = _teacher(R, B, R + B, 50.0)
    z = _ref_z(c, 100.0, bias)
    want_row = (torch.exp(zt - tl_row.double()[:, None]) * z).sum(1)
    want_col = (torch.exp(zt - tl_col.double()[None, :]) * z).sum(0)
    outs = [_run_cross(c, 100.0, bias, ct, 50.0, tl_row, tl_col, ch, nt) for ch, nt in
            (([(0, R)], 0), (_chunks(R, 3), 1), (_chunks(R, 3), 2))]
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a, b)
    for x_row, x_col in outs:
        _close(x_row, want_row, what="x_row")
        _close(x_col, want_col, what="x_col")


def _ref_d(z, lr, lc, alpha, beta, zt=None, tlr=None, tlc=None):
    """D and the elementwise magnitude of its terms (the scale of its error when they cancel)."""
    d = alpha * (torch.exp(z - lr.double()[:, None]) + torch.exp(z - lc.double()[None, :]))
    mag = d.abs()
    if zt is not None:
        t = beta * (torch.exp(zt - tlr.double()[:, None]) + torch.exp(zt - tlc.double()[None, :]))
        d, mag = d - t, mag + t.abs()
    return d, mag


@pytest.mark.parametrize("R,B", SHAPES)
@pytest.mark.parametrize("bias", [0.0, -10.0])
@pytest.mark.parametrize("teacher", [False, True])
def test_grad_in_place_and_sums(R, B, bias, teacher):
    scale, alpha, beta = 100.0, 0.5 / R, 0.3 / R
    c0 = _cos(R, B, seed=2 * R + B)
    z = _ref_z(c0, scale, bias)
    lr, lc = torch.logsumexp(z, 1).float(), torch.logsumexp(z, 0).float()
    if teacher:
        ct, zt, tlr, tlc = _teacher(R, B, 7, 30.0)
        want, mag = _ref_d(z, lr, lc, alpha, beta, zt, tlr, tlc)
    else:
        ct = zt = tlr = tlc = None
        want, mag = _ref_d(z, lr, lc, alpha, beta)
    want_dc, want_d = float((want * c0.double()).sum()), float(want.sum())
    results = []
    for chunks, nt in (([(0, R)], 0), (_chunks(R, 3), 1), (_chunks(R, 3), 2)):
        wide = torch.full((R, B + 9), 7.0)
        c = wide[:, 4:4 + B]
        c.copy_(c0)
        s_dc = s_d = 0.0
        for r0, r1 in chunks:
            out = C.contrastive_grad_rows(
                tv(c[r0:r1]), scale, bias, tv(lr[r0:r1]), tv(lc), alpha, beta,
                tv(ct[r0:r1]) if teacher else None, 30.0,
                tv(tlr[r0:r1]) if teacher else None, tv(tlc) if teacher else None, nt)
            assert isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, float) for v in out)
            s_dc += out[0]
            s_d += out[1]
        assert torch.equal(wide[:, :4], torch.full((R, 4), 7.0)) and torch.equal(wide[:, 4 + B:], torch.full((R, 5), 7.0))
        # each exp term carries the float32 rounding of its lse and of scale * c (|z| ~ 100): a few 1e-6 relative
        err = (c.double() - want).abs() / (mag + 1e-30)
        assert float(err.max()) <= 1e-5, f"D: relative error {float(err.max()):.3g}"
        assert abs(s_dc - want_dc) <= 1e-5 * float((mag * c0.double().abs()).sum()) + 1e-30
        assert abs(s_d - want_d) <= 1e-5 * float(mag.sum()) + 1e-30
        results.append((c.clone(), s_dc, s_d))
    assert torch.equal(results[1][0], results[2][0]) and results[1][1:] == results[2][1:]


def test_grad_teacher_equal_student_cancels():
    # same logits, same lse, alpha == beta: D == 0 exactly, and so are the sums
    R, B = 33, 1023
    c0 = _cos(R, B, seed=3)
    z = 40.0 * c0.double()
    lr, lc = torch.logsumexp(z, 1).float(), torch.logsumexp(z, 0).float()
    c = c0.clone()
    s = C.contrastive_grad_rows(tv(c), 40.0, 0.0, tv(lr), tv(lc), 0.25, 0.25, tv(c0), 40.0, tv(lr), tv(lc), 2)
    assert torch.equal(c, torch.zeros_like(c)) and s == (0.0, 0.0)


def test_nan_propagates():
    R, B = 9, 70
    c = _cos(R, B, seed=4)
    c[2, 5] = float("nan")
    lse_row, cmax, csum = _run_lse(c, 100.0, 0.0, [(0, 4), (4, 9)])
    lse_col = cmax + csum.log()
    assert torch.isnan(lse_row[2]) and torch.isnan(lse_col[5])
    assert torch.isfinite(lse_row[torch.arange(R) != 2]).all() and torch.isfinite(lse_col[torch.arange(B) != 5]).all()
    # one-row chunk whose only value in a column is NaN
    lse_row, cmax, csum = _run_lse(c, 100.0, 0.0, [(0, 2), (2, 3), (3, 9)])
    assert torch.isnan(cmax[5] + csum[5].log())
    ct, _, tlr, tlc = _teacher(R, B, 1, 20.0)
    x_row, x_col = _run_cross(c, 100.0, 0.0, ct, 20.0, tlr, tlc, [(0, R)])
    assert torch.isnan(x_row[2]) and torch.isnan(x_col[5]) and torch.isfinite(x_row[:2]).all()
    g = c.clone()
    lr, lc = torch.zeros(R), torch.zeros(B)
    s = C.contrastive_grad_rows(tv(g), 1.0, 0.0, tv(lr), tv(lc), 1.0, 0.0, None, 1.0, None, None)
    assert torch.isnan(g[2, 5]) and torch.isfinite(g[0]).all() and all(math.isnan(v) for v in s)


def test_empty_inputs_return():
    cmax, csum = torch.full((5,), -math.inf), torch.zeros(5)
    C.contrastive_lse_rows(tv(torch.empty(0, 5)), 100.0, 0.0, tv(torch.empty(0)), tv(cmax), tv(csum))
    assert torch.equal(cmax, torch.full((5,), -math.inf)) and torch.equal(csum, torch.zeros(5))
    C.contrastive_lse_rows(tv(torch.empty(3, 0)), 100.0, 0.0, tv(torch.empty(3)), tv(torch.empty(0)),
                           tv(torch.empty(0)))
    e = torch.empty(0, 4)
    C.contrastive_cross_rows(tv(e), 1.0, 0.0, tv(e), 1.0, tv(torch.empty(0)), tv(torch.zeros(4)),
                             tv(torch.empty(0)), tv(torch.zeros(4)))
    assert C.contrastive_grad_rows(tv(e), 1.0, 0.0, tv(torch.empty(0)), tv(torch.zeros(4)), 1.0, 0.0, None, 1.0,
                                   None, None) == (0.0, 0.0)


def test_bad_inputs_raise_naming_the_argument():
    R, B = 4, 6
    c = torch.zeros(R, B)
    lr, cm, cs = torch.zeros(R), torch.full((B,), -math.inf), torch.zeros(B)

    def lse(c=c, lr=lr, cm=cm, cs=cs):
        C.contrastive_lse_rows(tv(c), 1.0, 0.0, tv(lr), tv(cm), tv(cs))

    with pytest.raises(ValueError, match=r"c: expected dtype float32, got float64"):
        lse(c=c.double())
    with pytest.raises(ValueError, match=r"c: expected 2 dimensions"):
        lse(c=c[0])
    with pytest.raises(ValueError, match=r"c: expected column stride 1"):
        lse(c=torch.zeros(B, R).t())
    with pytest.raises(ValueError, match=r"lse_row: expected shape \(4,\)"):
        lse(lr=torch.zeros(R + 1))
    with pytest.raises(ValueError, match=r"col_max: expected shape \(6,\)"):
        lse(cm=torch.zeros(B - 1))
    with pytest.raises(ValueError, match=r"col_sum: expected dtype float32"):
        lse(cs=cs.double())
    with pytest.raises(ValueError, match=r"col_sum: expected a positive stride"):
        lse(cs=torch.zeros(1).expand(B))

    def cross(ct=c, tlr=lr, tlc=cs, xr=lr.clone(), xc=cs.clone()):
        C.contrastive_cross_rows(tv(c), 1.0, 0.0, tv(ct), 1.0, tv(tlr), tv(tlc), tv(xr), tv(xc))

    with pytest.raises(ValueError, match=r"ct: expected shape \(4, 6\) like c"):
        cross(ct=torch.zeros(R, B + 1))
    with pytest.raises(ValueError, match=r"ct: expected dtype float32"):
        cross(ct=c.double())
    with pytest.raises(ValueError, match=r"tlse_col: expected shape \(6,\)"):
        cross(tlc=torch.zeros(R))
    with pytest.raises(ValueError, match=r"x_row: expected shape \(4,\)"):
        cross(xr=torch.zeros(B))
    with pytest.raises(ValueError, match=r"x_col: expected dtype float32"):
        cross(xc=torch.zeros(B, dtype=torch.float64))

    def grad(lc=cs, ct=None, tlr=None, tlc=None):
        g = c.clone()
        return C.contrastive_grad_rows(tv(g), 1.0, 0.0, tv(lr), tv(lc), 1.0, 1.0, tv(ct), 1.0, tv(tlr), tv(tlc))

    with pytest.raises(ValueError, match=r"lse_col: expected shape \(6,\)"):
        grad(lc=torch.zeros(B + 2))
    with pytest.raises(ValueError, match=r"tlse_row: required when ct is given"):
        grad(ct=c, tlc=cs)
    with pytest.raises(ValueError, match=r"tlse_col: required when ct is given"):
        grad(ct=c, tlr=lr)
    with pytest.raises(ValueError, match=r"ct: expected shape"):
        grad(ct=c[:, :3], tlr=lr, tlc=cs)
    with pytest.raises(ValueError, match=r"tlse_row: expected dtype float32"):
        grad(ct=c, tlr=lr.double(), tlc=cs)
    with pytest.raises(ValueError, match=r"c: expected a row stride >= B"):
        C.contrastive_grad_rows(tv(torch.zeros(16).as_strided((R, B), (1, 1))), 1.0, 0.0, tv(lr), tv(cs), 1.0, 0.0,
                                None, 1.0, None, None)
