"""The op ``contrastive_loss``: CLIP's symmetric contrastive (InfoNCE) loss, fused — row and column log-sum-exp
from one pass over the similarity tiles, optional self-distillation from a teacher in the same op, a backward pass
into both feature sets, the logit scale and the bias — with memory O(B·D) on the Triton path (the B × B
similarity matrix never exists) and O(chunk·B) on the chunked CPU paths.

Inputs: image features ``f (B, D)`` and text features ``g (B, D)`` (pair i = image i with caption i), float32 /
float16 / bfloat16 (they may differ), any strides; the logit **multiplier** ``s`` (a one-element float tensor,
``model.logit_scale.exp()``, may require grad); an optional ``logit_bias`` ``b`` (one element, may require grad);
optional class ids ``y (B,)`` for class-aware targets; label smoothing ``eps``; an optional teacher ``(f_t, g_t,
s_t)`` (no gradient). With ``normalize=True`` the features are L2-normalised first (``F.normalize``: ``t / max(||t||,
1e-12)``); with ``False`` they are used as given (open_clip's ``ClipLoss``, whose models normalise). In float32:

* ``S_ij = s <f_i, g_j> + b``; ``lse_r_i = logsumexp_j S_ij`` (image → text), ``lse_c_j = logsumexp_i S_ij``
  (text → image), both with online maxima (no fixed-max shortcut: at s = 100 ``exp(S - s)`` underflows);
* targets ``t_ij``: one-hot on the diagonal, or with ``y`` uniform over the captions of the same class (itself
  included); smoothed ``(1 - eps) t_ij + eps / B``. Because ``t`` is symmetric, the target logit of row i is
  ``T_r_i = sum_j t_ij S_ij = s <f_i, (1-eps) pos_g_i + eps mean(g)> + b`` with ``pos_g_i = g_i`` (diagonal) or
  the mean ``g`` of row i's class — O(B·D), no tile needed — and likewise ``T_c_j`` with the roles swapped;
* ``contrastive = ½ [mean_i (lse_r_i - T_r_i) + mean_j (lse_c_j - T_c_j)]``
  (= ``½ [CE(S, t) + CE(Sᵀ, t)]``, open_clip's ``ClipLoss`` for one-hot targets);
* teacher: ``S^t_ij = s_t <f_t_i, g_t_j>`` (no bias), ``P^t = softmax_row(S^t)``, ``Q^t = softmax_col(S^t)``;
  ``distill = mean_i [lse_r_i - sum_j P^t_ij S_ij] + mean_j [lse_c_j - sum_i Q^t_ij S_ij]`` — soft-target CE in
  both directions, **summed** over the directions (CaRot's L_SD; gradient-equal to KL(teacher ‖ student)).

Backward (from the saved LSEs; the tiles are recomputed): with upstream gradients ``g_c``, ``g_d``,
``dS_ij = α (P_ij + Q_ij) - β (P^t_ij + Q^t_ij) - (g_c / B) t_ij`` where ``P, Q`` are the student's row / column
softmax, ``α = g_c / (2B) + g_d / B``, ``β = g_d / B``. The backends compute the tile part
``D = α (P + Q) - β (P^t + Q^t)``: ``dfn = s D g``, ``dgn = s Dᵀ f``, ``Σ D ⊙ cos`` and ``Σ D``; the target part
``-(g_c / B) t`` is applied in O(B·D) here. Then ``ds = Σ dS ⊙ cos``, ``db = Σ dS`` (0 up to rounding: the loss
does not depend on a constant shift) and the normalisation backward (as autograd of F.normalize).

**Backends** (each supplies the three tile primitives; the target terms, the teacher's LSE pass, normalisation
and the loss assembly are shared here):

* ``triton`` (``kernels/contrastive_loss.py``): one program per row block walks the column blocks; row LSE online
  in registers, column partials per row block merged by torch — row **and** column LSE from one pass (Inf-CL
  needs one pass per direction); backward kernels recompute tiles for ``dF`` and ``dG``.
* ``cpp``: torch's BLAS GEMM on row chunks of at most ``CHUNK_ELEMS`` cosines, then one OpenMP pass per chunk
  (``csrc/contrastive_loss.cpp``): row LSE plus an online merge of the column statistics, the teacher cross terms,
  and ``D`` in place with its sums.
* ``torch``: the same chunked driver with torch row functions (the reference; CPU/GPU fallback).

Layers (``docs/adding_an_op.md``): backends registered with :mod:`vlmfast._dispatch`, behind
``torch.ops.vlmfast.contrastive_loss`` / ``torch.ops.vlmfast.contrastive_loss_backward`` (custom ops with fakes,
joined by ``register_autograd``), behind :func:`clip_loss` (``vlmfast.functional``) and :class:`ClipLoss`
(``vlmfast.nn``; open_clip's ``ClipLoss`` call signature). :func:`clip_loss_ref` materialises ``S`` (the tests'
oracle).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view
from vlmfast.ops._features import check_features, dtype_reasons, normalize_backward, normalized

OP = "contrastive_loss"
CHUNK_ELEMS = 1 << 22  # cosines per row chunk on the chunked backends (16 MB of float32)


def _probe(device: str) -> dict[str, Any]:
    return {"f": torch.empty(2, 4, device=device), "g": torch.empty(2, 4, device=device)}


_dispatch.define_op(OP, device_arg="f", probe=_probe, differentiable=True, module=__name__)


class Teacher(NamedTuple):
    """A teacher for self-distillation: its image and text features ``(B, D_t)`` and its logit multiplier."""

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor | float


# ----------------------------------------------------------------------------------------------------------
# The chunked driver (torch and cpp): GEMM per row chunk by torch, the rest by a row function
# ----------------------------------------------------------------------------------------------------------


def _rows(b: int) -> int:
    return max(1, CHUNK_ELEMS // max(b, 1))


def _lse_chunked(f: Tensor, g: Tensor, s: Tensor, b: Tensor, rows_lse: Callable) -> tuple[Tensor, Tensor]:
    B = f.shape[0]
    f32, g32 = f.float(), g.float()
    lse_r = f32.new_empty(B)
    col_max = torch.full((B,), float("-inf"), dtype=torch.float32, device=f.device)
    col_sum = torch.zeros(B, dtype=torch.float32, device=f.device)
    step = _rows(B)
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        c = torch.mm(f32[r0:r1], g32.t())
        rows_lse(c, s, b, lse_r[r0:r1], col_max, col_sum)
    return lse_r, col_max + torch.log(col_sum)


def _cross_chunked(f, g, s, b, tf, tg, ts, tlse_r, tlse_c, rows_cross: Callable) -> tuple[Tensor, Tensor]:
    B = f.shape[0]
    f32, g32, tf32, tg32 = f.float(), g.float(), tf.float(), tg.float()
    x_r = f32.new_empty(B)
    x_c = torch.zeros(B, dtype=torch.float32, device=f.device)
    step = _rows(B)
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        c = torch.mm(f32[r0:r1], g32.t())
        ct = torch.mm(tf32[r0:r1], tg32.t())
        rows_cross(c, s, b, ct, ts, tlse_r[r0:r1], tlse_c, x_r[r0:r1], x_c)
    return x_r, x_c


def _grad_chunked(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c,
                  rows_grad: Callable) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B = f.shape[0]
    f32, g32 = f.float(), g.float()
    teacher = tf is not None
    tf32, tg32 = (tf.float(), tg.float()) if teacher else (None, None)
    df = torch.empty_like(f32)
    dg = torch.zeros_like(g32)
    sum_dcos = torch.zeros((), dtype=torch.float64, device=f.device)
    sum_d = torch.zeros((), dtype=torch.float64, device=f.device)
    step = _rows(B)
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        c = torch.mm(f32[r0:r1], g32.t())
        ct = torch.mm(tf32[r0:r1], tg32.t()) if teacher else None
        a, d = rows_grad(c, s, b, lse_r[r0:r1], lse_c, alpha, beta, ct, ts,
                         tlse_r[r0:r1] if teacher else None, tlse_c)
        sum_dcos += a
        sum_d += d
        torch.mm(c, g32, out=df[r0:r1])  # c holds D now
        dg.addmm_(c.t(), f32[r0:r1])
    sf = s.float()
    return df.mul_(sf), dg.mul_(sf), sum_dcos.float(), sum_d.float()


# torch row functions (the reference's inner loops)

def _lse_rows_torch(c, s, b, lse_r, col_max, col_sum):
    z = c.mul(s).add_(b)
    lse_r.copy_(torch.logsumexp(z, dim=1))
    new = torch.maximum(col_max, z.amax(dim=0))
    col_sum.mul_(torch.exp(col_max - new)).add_(torch.exp(z - new).sum(dim=0))
    col_max.copy_(new)


def _cross_rows_torch(c, s, b, ct, ts, tlse_r, tlse_c, x_r, x_c):
    z = c.mul(s).add_(b)
    zt = ct.mul(ts)
    x_r.copy_((torch.exp(zt - tlse_r.unsqueeze(1)) * z).sum(dim=1))
    x_c.add_((torch.exp(zt - tlse_c.unsqueeze(0)) * z).sum(dim=0))


def _grad_rows_torch(c, s, b, lse_r, lse_c, alpha, beta, ct, ts, tlse_r, tlse_c):
    z = c.mul(s).add_(b)
    d = (torch.exp(z - lse_r.unsqueeze(1)) + torch.exp(z - lse_c.unsqueeze(0))).mul_(alpha)
    if ct is not None:
        zt = ct.mul(ts)
        d.sub_((torch.exp(zt - tlse_r.unsqueeze(1)) + torch.exp(zt - tlse_c.unsqueeze(0))).mul_(beta))
    sum_dcos = (d.double() * c.double()).sum()
    sum_d = d.double().sum()
    c.copy_(d)
    return sum_dcos, sum_d


# cpp row functions (csrc/contrastive_loss.cpp)

def _f(t: Tensor) -> float:
    return float(t)


def _lse_rows_cpp(c, s, b, lse_r, col_max, col_sum):
    get_C().contrastive_lse_rows(tensor_view(c), _f(s), _f(b), tensor_view(lse_r), tensor_view(col_max),
                                 tensor_view(col_sum), torch.get_num_threads())


def _cross_rows_cpp(c, s, b, ct, ts, tlse_r, tlse_c, x_r, x_c):
    get_C().contrastive_cross_rows(tensor_view(c), _f(s), _f(b), tensor_view(ct), _f(ts), tensor_view(tlse_r),
                                   tensor_view(tlse_c), tensor_view(x_r), tensor_view(x_c), torch.get_num_threads())


def _grad_rows_cpp(c, s, b, lse_r, lse_c, alpha, beta, ct, ts, tlse_r, tlse_c):
    teacher = ct is not None
    a, d = get_C().contrastive_grad_rows(
        tensor_view(c), _f(s), _f(b), tensor_view(lse_r), tensor_view(lse_c), _f(alpha), _f(beta),
        tensor_view(ct) if teacher else None, _f(ts) if teacher else 0.0,
        tensor_view(tlse_r) if teacher else None, tensor_view(tlse_c) if teacher else None, torch.get_num_threads())
    return torch.tensor(a, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Backends. forward(f, g, s, b, tf, tg, ts) -> (lse_r, lse_c, tlse_r, tlse_c, x_r, x_c) (teacher ones empty
# without a teacher); backward(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c)
# -> (dfn, dgn, sum D*cos, sum D). f, g (and tf, tg) are what the loss sees (normalised when asked).
# ----------------------------------------------------------------------------------------------------------


def _forward_with(lse_fn: Callable, cross_fn: Callable):
    def forward(f, g, s, b, tf, tg, ts):
        lse_r, lse_c = lse_fn(f, g, s, b)
        if tf is None:
            return lse_r, lse_c, *(lse_r.new_empty(0) for _ in range(4))
        tlse_r, tlse_c = lse_fn(tf, tg, ts, torch.zeros_like(s))
        x_r, x_c = cross_fn(f, g, s, b, tf, tg, ts, tlse_r, tlse_c)
        return lse_r, lse_c, tlse_r, tlse_c, x_r, x_c

    return forward


def _torch_lse(f, g, s, b):
    return _lse_chunked(f, g, s, b, _lse_rows_torch)


def _torch_cross(f, g, s, b, tf, tg, ts, tlse_r, tlse_c):
    return _cross_chunked(f, g, s, b, tf, tg, ts, tlse_r, tlse_c, _cross_rows_torch)


def _bwd_torch(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c):
    return _grad_chunked(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c, _grad_rows_torch)


_fwd_torch = _dispatch.register(OP, "torch", backward=_bwd_torch)(_forward_with(_torch_lse, _torch_cross))


def _check_dtypes(f: Tensor, g: Tensor, **_) -> list[str]:
    return dtype_reasons(f=f, g=g)


def _check_cpp_built(f: Tensor, g: Tensor, **_) -> list[str]:
    reasons = _check_dtypes(f, g)
    try:
        if not hasattr(get_C(), "contrastive_lse_rows"):
            reasons.append("the built extension has no contrastive_loss kernels (rebuild: pip install -e .)")
    except Exception as exc:  # the backend's own availability reports a missing extension
        reasons.append(str(exc))
    return reasons


def _cpp_lse(f, g, s, b):
    return _lse_chunked(f, g, s, b, _lse_rows_cpp)


def _cpp_cross(f, g, s, b, tf, tg, ts, tlse_r, tlse_c):
    return _cross_chunked(f, g, s, b, tf, tg, ts, tlse_r, tlse_c, _cross_rows_cpp)


def _bwd_cpp(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c):
    return _grad_chunked(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c, _grad_rows_cpp)


_fwd_cpp = _dispatch.register(OP, "cpp", _check_cpp_built, backward=_bwd_cpp)(_forward_with(_cpp_lse, _cpp_cross))


def _triton_lse(f, g, s, b):
    from vlmfast.kernels.contrastive_loss import contrastive_lse

    return contrastive_lse(f, g, s, b)


def _triton_cross(f, g, s, b, tf, tg, ts, tlse_r, tlse_c):
    from vlmfast.kernels.contrastive_loss import contrastive_cross

    return contrastive_cross(f, g, s, b, tf, tg, ts, tlse_r, tlse_c)


def _bwd_triton(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c):
    from vlmfast.kernels.contrastive_loss import contrastive_grad

    if tf is None:
        return contrastive_grad(f, g, s, b, lse_r, lse_c, alpha, beta)
    return contrastive_grad(f, g, s, b, lse_r, lse_c, alpha, beta, tf, tg, ts, tlse_r, tlse_c)


_fwd_triton = _dispatch.register(OP, "triton", _check_dtypes, module="vlmfast.kernels.contrastive_loss",
                                 backward=_bwd_triton)(_forward_with(_triton_lse, _triton_cross))


# ----------------------------------------------------------------------------------------------------------
# Shared math: normalisation, targets, loss assembly, the target part of the backward
# ----------------------------------------------------------------------------------------------------------


def _prepare(t: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """(what the loss sees in float32, the clamped norms or None)."""
    if normalize:
        return normalized(t)
    return t.float(), None


def _class_means(t: Tensor, labels: Tensor) -> Tensor:
    """Row i -> the mean of the rows of ``t`` whose label equals ``labels[i]`` (no host sync: a sort and
    segment sums)."""
    B = t.shape[0]
    order = torch.argsort(labels, stable=True)
    sl = labels[order]
    seg = torch.zeros(B, dtype=torch.int64, device=t.device)
    if B > 1:
        seg[1:] = torch.cumsum((sl[1:] != sl[:-1]).to(torch.int64), dim=0)
    sums = torch.zeros_like(t).index_add_(0, seg, t[order])
    counts = torch.zeros(B, dtype=t.dtype, device=t.device).index_add_(0, seg, torch.ones_like(t[:, 0]))
    means_sorted = (sums / counts.clamp_min(1).unsqueeze(1))[seg]
    out = torch.empty_like(t)
    out[order] = means_sorted
    return out


def _target_dirs(fn: Tensor, gn: Tensor, labels: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """``(u, v)``: ``T_r_i = s <fn_i, u_i> + b`` and ``T_c_j = s <gn_j, v_j> + b`` (the smoothed target mixes)."""
    pos_g = gn if labels is None else _class_means(gn, labels)
    pos_f = fn if labels is None else _class_means(fn, labels)
    u = pos_g if eps == 0 else (1.0 - eps) * pos_g + eps * gn.mean(dim=0, keepdim=True)
    v = pos_f if eps == 0 else (1.0 - eps) * pos_f + eps * fn.mean(dim=0, keepdim=True)
    return u, v


class _Prepared:
    """What both custom ops feed the backend: the features the loss sees in float32 (``fn``, ``gn``, their norms),
    the backend's copies (``kf``, ``kg``, ``ktf``, ``ktg``: the input dtype for triton's 16-bit tiles, float32
    otherwise) and the detached float32 scalars ``s``, ``b``, ``ts``."""

    def __init__(self, backend, f, g, scale, bias, tf, tg, tscale, normalize: bool) -> None:
        native = backend == "triton"
        self.fn, self.fnorm = _prepare(f, normalize)
        self.gn, self.gnorm = _prepare(g, normalize)
        self.s, self.b = _scalars(scale, bias, f.device)
        self.kf, self.kg = (self.fn.to(f.dtype), self.gn.to(g.dtype)) if native else (self.fn, self.gn)
        self.teacher = tf is not None
        self.ktf = self.ktg = self.ts = None
        if self.teacher:
            tfn, _ = _prepare(tf, normalize)
            tgn, _ = _prepare(tg, normalize)
            self.ts = tscale.detach().float().reshape(())
            self.ktf, self.ktg = (tfn.to(tf.dtype), tgn.to(tg.dtype)) if native else (tfn, tgn)


def _scalars(scale: Tensor, bias: Tensor | None, dev) -> tuple[Tensor, Tensor]:
    s = scale.detach().float().reshape(())
    b = bias.detach().float().reshape(()) if bias is not None else torch.zeros((), dtype=torch.float32, device=dev)
    return s, b


# ----------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmfast::contrastive_loss", mutates_args=())
def _contrastive_op(f: Tensor, g: Tensor, scale: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                    tf: Optional[Tensor], tg: Optional[Tensor], tscale: Optional[Tensor], label_smoothing: float,
                    normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(contrastive, distill, lse_r, lse_c, tlse_r, tlse_c)``; distill is 0 and the teacher LSEs empty without a
    teacher."""
    impl = _dispatch.select(OP, backend or None, f=f, g=g)
    p = _Prepared(impl.backend, f, g, scale, bias, tf, tg, tscale, normalize)
    fn, gn, s, b, teacher = p.fn, p.gn, p.s, p.b, p.teacher
    lse_r, lse_c, tlse_r, tlse_c, x_r, x_c = impl.forward(p.kf, p.kg, s, b, p.ktf, p.ktg, p.ts)
    u, v = _target_dirs(fn, gn, labels, label_smoothing)
    t_r = s * (fn * u).sum(dim=1) + b
    t_c = s * (gn * v).sum(dim=1) + b
    contrastive = 0.5 * ((lse_r - t_r).mean() + (lse_c - t_c).mean())
    if teacher:
        distill = (lse_r - x_r).mean() + (lse_c - x_c).mean()
    else:
        distill = torch.zeros((), dtype=torch.float32, device=f.device)
    return contrastive, distill, lse_r, lse_c, tlse_r, tlse_c


@_contrastive_op.register_fake
def _contrastive_fake(f, g, scale, bias, labels, tf, tg, tscale, label_smoothing, normalize, backend):
    B = f.shape[0]
    z = f.new_empty((), dtype=torch.float32)
    v = f.new_empty(B, dtype=torch.float32)
    t = f.new_empty(B if tf is not None else 0, dtype=torch.float32)
    return z, torch.empty_like(z), v, torch.empty_like(v), t, torch.empty_like(t)


@torch.library.custom_op("vlmfast::contrastive_loss_backward", mutates_args=())
def _contrastive_backward_op(grad_c: Tensor, grad_d: Tensor, f: Tensor, g: Tensor, scale: Tensor,
                             bias: Optional[Tensor], labels: Optional[Tensor], tf: Optional[Tensor],
                             tg: Optional[Tensor], tscale: Optional[Tensor], lse_r: Tensor, lse_c: Tensor,
                             tlse_r: Tensor, tlse_c: Tensor, label_smoothing: float, normalize: bool,
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(df, dg, dscale, dbias)`` (dbias 0-d float32 even without a bias)."""
    impl = _dispatch.select(OP, backend or None, f=f, g=g)
    B = f.shape[0]
    p = _Prepared(impl.backend, f, g, scale, bias, tf, tg, tscale, normalize)
    fn, gn, s, b, teacher = p.fn, p.gn, p.s, p.b, p.teacher
    gc = grad_c.float().reshape(())
    gd = grad_d.float().reshape(()) if teacher else torch.zeros_like(gc)
    alpha = gc / (2 * B) + gd / B
    beta = gd / B
    dfn, dgn, sum_dcos, sum_d = impl.backward(p.kf, p.kg, s, b, lse_r, lse_c, alpha, beta, p.ktf, p.ktg, p.ts,
                                              tlse_r if teacher else None, tlse_c if teacher else None)
    # the target part: loss_c contains -(g_c / B) sum_ij t_ij S_ij
    u, v = _target_dirs(fn, gn, labels, label_smoothing)
    w = gc / B
    dfn = dfn - (w * s) * u
    dgn = dgn - (w * s) * v
    dscale = sum_dcos - w * (fn * u).sum()
    dbias = sum_d - gc
    df = normalize_backward(dfn, fn, p.fnorm) if normalize else dfn
    dg = normalize_backward(dgn, gn, p.gnorm) if normalize else dgn
    return df.to(f.dtype), dg.to(g.dtype), dscale.to(scale.dtype).reshape(scale.shape), dbias.reshape(())


@_contrastive_backward_op.register_fake
def _contrastive_backward_fake(grad_c, grad_d, f, g, scale, bias, labels, tf, tg, tscale, lse_r, lse_c, tlse_r,
                               tlse_c, label_smoothing, normalize, backend):
    return (torch.empty_like(f), torch.empty_like(g), torch.empty_like(scale),
            f.new_empty((), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    f, g, scale, bias, labels, tf, tg, tscale, label_smoothing, normalize, backend = inputs
    ctx.save_for_backward(f, g, scale, bias, labels, tf, tg, tscale, output[2], output[3], output[4], output[5])
    ctx.label_smoothing, ctx.normalize, ctx.backend = label_smoothing, normalize, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.mark_non_differentiable(output[2], output[3], output[4], output[5])


def _backward(ctx, grad_c, grad_d, _g1, _g2, _g3, _g4):
    f, g, scale, bias, labels, tf, tg, tscale, lse_r, lse_c, tlse_r, tlse_c = ctx.saved_tensors
    zero = torch.zeros((), dtype=torch.float32, device=f.device)
    grad_c = zero if grad_c is None else grad_c
    grad_d = zero if grad_d is None else grad_d
    df, dg, dscale, dbias = torch.ops.vlmfast.contrastive_loss_backward(
        grad_c, grad_d, f, g, scale, bias, labels, tf, tg, tscale, lse_r, lse_c, tlse_r, tlse_c,
        ctx.label_smoothing, ctx.normalize, ctx.backend)
    db = None if bias is None else dbias.to(ctx.bias_dtype).reshape(ctx.bias_shape)
    return df, dg, dscale, db, None, None, None, None, None, None, None


_contrastive_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def _check_features_2d(t: Any, name: str) -> Tensor:
    return check_features(t, name, "(B, D)")


def _check_scalar(v: Any, name: str, device, *, optional: bool = False) -> Tensor | None:
    if v is None and optional:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor(float(v), device=device)
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a float or a one-element tensor, got {type(v).__name__}")
    if v.numel() != 1 or not v.is_floating_point():
        raise ValueError(f"{name}: expected a one-element float tensor, got shape {tuple(v.shape)} {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name}: expected on the features' device {device}, got {v.device}")
    return v


def check_inputs(image_features: Any, text_features: Any, logit_scale: Any, logit_bias: Any, labels: Any,
                 label_smoothing: Any, teacher: Any) -> tuple:
    """Metadata checks (no host sync). Returns ``(f, g, scale, bias, labels, eps, tf, tg, tscale)``."""
    f = _check_features_2d(image_features, "image_features")
    g = _check_features_2d(text_features, "text_features")
    if f.shape != g.shape:
        raise ValueError(f"image_features/text_features: expected the same shape (B, D) (pair i is image i with "
                         f"caption i), got {tuple(f.shape)} and {tuple(g.shape)}")
    B, D = f.shape
    if B == 0 or D == 0:
        raise ValueError(f"image_features: expected B, D >= 1, got shape {tuple(f.shape)}")
    if g.device != f.device:
        raise ValueError(f"text_features: expected on the image features' device {f.device}, got {g.device}")
    scale = _check_scalar(logit_scale, "logit_scale", f.device)
    bias = _check_scalar(logit_bias, "logit_bias", f.device, optional=True)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected an integer tensor of shape ({B},) or None, got "
                            f"{type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
        if tuple(labels.shape) != (B,):
            raise ValueError(f"labels: expected shape ({B},) (one class id per pair), got {tuple(labels.shape)}")
        if labels.device != f.device:
            raise ValueError(f"labels: expected on the features' device {f.device}, got {labels.device}")
        labels = labels.to(torch.int64).contiguous()
    tf = tg = tscale = None
    if teacher is not None:
        if not isinstance(teacher, (tuple, list)) or len(teacher) != 3:
            raise TypeError("teacher: expected (image_features, text_features, logit_scale) of the teacher, got "
                            f"{type(teacher).__name__}" + (f" of length {len(teacher)}"
                                                           if isinstance(teacher, (tuple, list)) else ""))
        tf = _check_features_2d(teacher[0], "teacher[0] (image_features)").detach()
        tg = _check_features_2d(teacher[1], "teacher[1] (text_features)").detach()
        for name, t in (("teacher[0] (image_features)", tf), ("teacher[1] (text_features)", tg)):
            if t.shape[0] != B:
                raise ValueError(f"{name}: expected {B} rows (one per pair of the student batch), got "
                                 f"{tuple(t.shape)}")
            if t.device != f.device:
                raise ValueError(f"{name}: expected on the student's device {f.device}, got {t.device}")
        if tf.shape != tg.shape:
            raise ValueError(f"teacher: expected image and text features of the same shape, got {tuple(tf.shape)} "
                             f"and {tuple(tg.shape)}")
        tscale = _check_scalar(teacher[2], "teacher[2] (logit_scale)", f.device).detach()
    return f, g, scale, bias, labels, float(label_smoothing), tf, tg, tscale


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    logit_bias: Tensor | float | None = None,
    label_smoothing: float = 0.0,
    labels: Tensor | None = None,
    teacher: Teacher | tuple | None = None,
    normalize: bool = True,
    output_dict: bool = False,
    backend: str | None = None,
) -> Any:
    """Fused symmetric CLIP contrastive loss (module docs).

    Args:
        image_features, text_features: ``(B, D)``; pair i = (image i, caption i). Normalised inside unless
            ``normalize=False`` (then used as given, as open_clip's ``ClipLoss``).
        logit_scale: the multiplier (``model.logit_scale.exp()``), float or one-element tensor (may require grad).
        logit_bias: optional additive bias (a constant shift: it does not change this loss; accepted for
            open_clip parity, gradient 0 up to rounding).
        label_smoothing: in [0, 1], as ``F.cross_entropy`` on both directions.
        labels: optional ``(B,)`` class ids: class-aware targets (uniform over the same-class captions).
        teacher: optional ``(image_features, text_features, logit_scale)`` of a teacher (detached) for
            self-distillation: soft-target CE toward the teacher's row and column softmax, summed over the two
            directions (CaRot's L_SD).
        output_dict: return ``{"contrastive_loss": ...}`` (plus ``"distill_loss"`` with a teacher).
        backend: force ``"triton"``, ``"cpp"`` or ``"torch"`` (default: the first that can run).

    Returns: the scalar contrastive loss; with a teacher the pair ``(contrastive, distill)`` (as open_clip's
    ``DistillClipLoss``); with ``output_dict`` a dict.
    """
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    f, g, scale, bias, y, eps, tf, tg, ts = check_inputs(image_features, text_features, logit_scale, logit_bias,
                                                         labels, label_smoothing, teacher)
    compiling = torch.compiler.is_compiling()
    name = (backend or "") if compiling else _dispatch.choose(OP, backend, f=f, g=g)
    contrastive, distill, *_ = torch.ops.vlmfast.contrastive_loss(f, g, scale, bias, y, tf, tg, ts, eps, normalize,
                                                                  name)
    if output_dict:
        out = {"contrastive_loss": contrastive}
        if tf is not None:
            out["distill_loss"] = distill
        return out
    return (contrastive, distill) if tf is not None else contrastive


def clip_loss_ref(image_features, text_features, logit_scale, *, logit_bias=None, label_smoothing: float = 0.0,
                  labels=None, teacher=None, normalize: bool = True):
    """The materialised formula (autograd does the backward): the tests' oracle. Same returns as
    :func:`clip_loss` without ``output_dict``."""
    f, g = image_features.float(), text_features.float()
    if normalize:
        f, g = F.normalize(f, dim=-1), F.normalize(g, dim=-1)
    s = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
    S = s.float().reshape(()) * f @ g.t()
    if logit_bias is not None:
        S = S + (logit_bias.float().reshape(()) if isinstance(logit_bias, Tensor) else float(logit_bias))
    B = S.shape[0]
    if labels is None:
        t = torch.eye(B, dtype=S.dtype, device=S.device)
    else:
        same = (labels[:, None] == labels[None, :]).to(S.dtype)
        t = same / same.sum(1, keepdim=True)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / B
    loss = 0.5 * (F.cross_entropy(S, t) + F.cross_entropy(S.t(), t))
    if teacher is None:
        return loss
    tf, tg = teacher[0].detach().float(), teacher[1].detach().float()
    if normalize:
        tf, tg = F.normalize(tf, dim=-1), F.normalize(tg, dim=-1)
    ts = teacher[2] if isinstance(teacher[2], Tensor) else torch.tensor(float(teacher[2]))
    St = ts.detach().float().reshape(()) * tf @ tg.t()
    distill = (-(St.softmax(1) * S.log_softmax(1)).sum(1).mean()
               - (St.t().softmax(1) * S.t().log_softmax(1)).sum(1).mean())
    return loss, distill
