"""The op ``region_loss``: RaVL's region-aware mitigation loss (``shared/specs/methods_ravl.md`` section 2,
point 3): the relevant regions of an image must prefer its own label over the other labels of the batch and over
every spurious region's best match (``L_R``), and the label must prefer the image's relevant regions over other
classes' images and over all spurious regions (``L_A``).

Inputs (one device):

* ``regions (B, R, D)`` float32 / float16 / bfloat16, any strides, differentiable: the region embeddings of B
  images, padded to R regions per image;
* ``text (C, D)`` float32 / float16 / bfloat16 (may differ from ``regions``), any strides, differentiable too
  (usually frozen): the class text embeddings;
* ``labels (B,)`` integer, values in ``[0, C)``: the class of each image;
* ``relevant (B, R)`` and ``spurious (B, R)`` bool: the region kinds. A region that is neither is padding (it takes
  no part and gets a zero gradient). **Spurious wins**: a region flagged both is spurious only (there is no host
  sync to raise on it; RaVL assigns every region to one cluster, so it does not happen there).
* ``temperature`` tau > 0 (default 0.07), ``normalize`` (default True: L2-normalise the region vectors and the
  text rows first, as ``F.normalize`` with its 1e-12 clamp — an all-zero padding row stays zero, no NaN in the
  loss or the gradients), ``reduction`` ``"mean"`` / ``"sum"`` / ``"none"``.

Semantics (float32 throughout, with max-subtracted log-sum-exps), ``sim(r, y) = <r, t_y> / tau``:

* ``Y_B`` = the set of **unique** labels of the batch (of all B images, with or without relevant regions);
  ``S_B`` = all spurious regions of the batch, pooled; ``H`` = the images with at least one relevant region.
* For ``i`` in ``H``: ``m_i(y) = max_{r relevant in i} sim(r, y)``.
* ``L_R^i = -m_i(y_i) + log[ sum_{y in Y_B} exp m_i(y) + sum_{r in S_B} max_{y in Y_B} exp sim(r, y) ]``;
* ``L_A^i = -m_i(y_i) + log[ exp m_i(y_i) + sum_{j in H, y_j != y_i} exp m_j(y_i) + sum_{r in S_B} exp sim(r, y_i) ]``
  (images j with the same label as i, i included, are not negatives of i; duplicate labels are fine);
* per-image loss ``L_R^i + L_A^i``; images outside ``H`` get 0 and no gradient. ``reduction="mean"``: the mean over
  ``H`` (0, with zero gradients, when ``H`` is empty), ``"sum"``: the sum, ``"none"``: the ``(B,)`` float32 vector.
* **Ties**: the gradient of ``m_i(y)`` goes to the FIRST relevant region reaching the maximum (lowest region
  index), and that of ``max_{y in Y_B} sim(r, y)`` to the first class (lowest class index) reaching it — one valid
  subgradient, the one ``torch.max`` picks.
* Non-finite inputs are not detected (NaN or inf embeddings give NaN/inf losses). With ``validate_args=True`` an
  out-of-range label raises a ValueError (one host sync); with ``False`` (and under ``torch.compile``) labels are
  clamped into ``[0, C)``.

The result (:class:`RegionLossOutput`): ``loss`` (reduced, float32), the per-image ``relevance_loss`` ``L_R`` and
``attribute_loss`` ``L_A`` ``(B,)`` float32 (0 outside ``H``; differentiable too) and ``has_relevant (B,)`` bool.
The gradients come back in the input dtypes.

**Tile primitives, shared assembly** (``docs/adding_an_op.md``). With ``rn, tn`` what the loss sees (normalised
when asked; float32), a backend supplies two passes over the ``B x R x C`` similarities:

* ``forward(rn, tn, rel, spu, present, inv_tau)`` -> ``m (B, C)`` (-inf for images outside H), ``am (B, C)`` int64
  (the first argmax region, -1 outside H), ``sl (B, C)`` = ``logsumexp`` over the image's spurious regions of
  ``sim(r, c)`` (-inf without one), ``smax (B, R)`` = ``max_{y in Y_B} sim(r, y)`` and ``sarg (B, R)`` int64 its
  first argmax class (for every region; only the spurious ones are used);
* ``backward(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau)`` -> ``(drn, dtn)``, the gradients wrt ``rn`` and
  ``tn`` of the similarity gradient ``dsim[b, r, c] = [r = am[b, c]] dm[b, c] + spu[b, r] (exp(min(sim - za[c],
  0)) ga[c] + [c = sarg[b, r]] dsmax[b, r])``.

Everything O(B C + B R) is done here once: the L_R / L_A assembly, their backward (``dm``: the gradient wrt ``m``;
``dsmax``: wrt the spurious regions' best matches; ``za, ga``: the per-class reference LSE and weights of L_A's
spurious and other-image terms, ``za = +inf`` for a class no image of H has), and the normalisation backward. All
exponents are ``<= 0`` by construction (every LSE is taken against a denominator that contains its term).

**Backends**:

* ``triton`` (``kernels/region_loss.py``): one forward kernel per (image block, class tile) fusing the similarity
  GEMM (``tl.dot`` over D chunks, float32 "ieee") with the masked running max/argmax over the relevant regions,
  the online LSE over the spurious ones and the best present class of each region; one backward kernel recomputing
  the tiles into ``dsim (B, R, C)``, then two torch GEMMs scatter it into regions and text.
* ``cpp``: torch's BLAS GEMM on image chunks of at most ``CHUNK_ELEMS`` similarities (``docs/adding_an_op.md``,
  "GEMM-shaped ops on CPU"), then one OpenMP pass per chunk (``csrc/region_loss.cpp``): the masked max/argmax,
  the spurious LSEs and best classes (forward), ``dsim`` in place (backward), followed by the two GEMMs.
* ``torch``: the same chunked driver with torch row functions (the CPU/GPU fallback).

:func:`region_loss_ref` is the plain formula with autograd (per-image loops; ``torch.max`` / ``torch.logsumexp``):
the tests' oracle. Layers: backends registered with :mod:`vlmfast._dispatch`, behind
``torch.ops.vlmfast.region_loss`` / ``torch.ops.vlmfast.region_loss_backward`` (custom ops with fakes, joined by
``register_autograd``, so the op runs inside ``torch.compile(fullgraph=True)``), behind :func:`region_loss`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view
from vlmfast.ops._features import FLOAT_DTYPES, dtype_reasons, normalize_backward, normalized

OP = "region_loss"
REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMS = 1 << 22  # similarities per image chunk of the chunked backends (16 MB of float32)
_INF = float("inf")


def _probe(device: str) -> dict[str, Any]:
    return {"regions": torch.empty(1, 1, 4, device=device), "text": torch.empty(2, 4, device=device)}


_dispatch.define_op(OP, device_arg="regions", probe=_probe, differentiable=True, module=__name__)


class RegionLossOutput(NamedTuple):
    """What :func:`region_loss` returns: ``loss`` float32 (reduced as asked; ``(B,)`` for ``"none"``), the
    per-image ``relevance_loss`` (L_R) and ``attribute_loss`` (L_A) ``(B,)`` float32 (0 for images without a
    relevant region) and ``has_relevant (B,)`` bool."""

    loss: Tensor
    relevance_loss: Tensor
    attribute_loss: Tensor
    has_relevant: Tensor


# ----------------------------------------------------------------------------------------------------------
# The chunked driver (torch and cpp): the GEMM per image chunk by torch, the rest by a row function
# ----------------------------------------------------------------------------------------------------------


def _images_per_chunk(R: int, C: int) -> int:
    return max(1, CHUNK_ELEMS // max(R * C, 1))


def _stats_chunked(rn, tn, rel, spu, present, inv_tau, rows_fn: Callable):
    B, R, D = rn.shape
    C = tn.shape[0]
    m = rn.new_empty(B, C)
    am = rn.new_empty(B, C, dtype=torch.int64)
    sl = rn.new_empty(B, C)
    smax = rn.new_empty(B, R)
    sarg = rn.new_empty(B, R, dtype=torch.int64)
    step = _images_per_chunk(R, C)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        c = torch.mm(rn[b0:b1].reshape(-1, D), tn.t()).view(b1 - b0, R, C)
        rows_fn(c, inv_tau, rel[b0:b1], spu[b0:b1], present, m[b0:b1], am[b0:b1], sl[b0:b1], smax[b0:b1],
                sarg[b0:b1])
    return m, am, sl, smax, sarg


def _grad_chunked(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau, rows_fn: Callable):
    B, R, D = rn.shape
    C = tn.shape[0]
    drn = rn.new_empty(B, R, D)
    dtn = tn.new_zeros(C, D)
    step = _images_per_chunk(R, C)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        x = rn[b0:b1].reshape(-1, D)
        c = torch.mm(x, tn.t())
        rows_fn(c.view(b1 - b0, R, C), inv_tau, spu[b0:b1], am[b0:b1], dm[b0:b1], za, ga, sarg[b0:b1],
                dsmax[b0:b1])  # c holds dsim now
        torch.mm(c, tn, out=drn[b0:b1].view(-1, D))
        dtn.addmm_(c.t(), x)
    return drn.mul_(inv_tau), dtn.mul_(inv_tau)


# torch row functions

def _stats_rows_torch(c, inv_tau, rel, spu, present, m, am, sl, smax, sarg):
    z = c * inv_tau  # (nb, R, C)
    mv, mi = z.masked_fill(~rel.unsqueeze(2), -_INF).max(dim=1)  # the first region on ties
    m.copy_(mv)
    am.copy_(torch.where(rel.any(dim=1, keepdim=True), mi, torch.full_like(mi, -1)))
    sl.copy_(torch.logsumexp(z.masked_fill(~spu.unsqueeze(2), -_INF), dim=1))
    sv, si = z.masked_fill(~present, -_INF).max(dim=2)  # the first class on ties
    smax.copy_(sv)
    sarg.copy_(si)


def _grad_rows_torch(c, inv_tau, spu, am, dm, za, ga, sarg, dsmax):
    z = c * inv_tau
    R, C = z.shape[1], z.shape[2]
    regions = torch.arange(R, device=z.device).view(1, R, 1)
    classes = torch.arange(C, device=z.device)
    d = torch.where(regions == am.unsqueeze(1), dm.unsqueeze(1), 0.0)
    e = torch.exp((z - za).clamp_max(0.0)) * ga
    e = e + torch.where(classes == sarg.unsqueeze(2), dsmax.unsqueeze(2), 0.0)
    c.copy_(d + torch.where(spu.unsqueeze(2), e, 0.0))


# cpp row functions (csrc/region_loss.cpp)

def _stats_rows_cpp(c, inv_tau, rel, spu, present, m, am, sl, smax, sarg):
    get_C().region_loss_stats_rows(tensor_view(c), float(inv_tau), tensor_view(rel), tensor_view(spu),
                                   tensor_view(present), tensor_view(m), tensor_view(am), tensor_view(sl),
                                   tensor_view(smax), tensor_view(sarg), torch.get_num_threads())


def _grad_rows_cpp(c, inv_tau, spu, am, dm, za, ga, sarg, dsmax):
    get_C().region_loss_grad_rows(tensor_view(c), float(inv_tau), tensor_view(spu), tensor_view(am),
                                  tensor_view(dm), tensor_view(za), tensor_view(ga), tensor_view(sarg),
                                  tensor_view(dsmax), torch.get_num_threads())


# ----------------------------------------------------------------------------------------------------------
# Backends. forward(rn, tn, rel, spu, present, inv_tau) -> (m, am, sl, smax, sarg);
# backward(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau) -> (drn, dtn). rn (B, R, D), tn (C, D) float32.
# ----------------------------------------------------------------------------------------------------------


def _check_dtypes(regions: Tensor, text: Tensor, **_) -> list[str]:
    return dtype_reasons(regions=regions, text=text)


def _bwd_torch(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau):
    return _grad_chunked(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau, _grad_rows_torch)


@_dispatch.register(OP, "torch", backward=_bwd_torch)
def _fwd_torch(rn, tn, rel, spu, present, inv_tau):
    return _stats_chunked(rn, tn, rel, spu, present, inv_tau, _stats_rows_torch)


def _check_cpp(regions: Tensor, text: Tensor, **_) -> list[str]:
    reasons = _check_dtypes(regions, text)
    try:
        if not hasattr(get_C(), "region_loss_stats_rows"):
            reasons.append("the built extension has no region_loss kernels (rebuild: pip install -e .)")
    except Exception as exc:  # the backend's own availability reports a missing extension
        reasons.append(str(exc))
    return reasons


def _bwd_cpp(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau):
    return _grad_chunked(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau, _grad_rows_cpp)


@_dispatch.register(OP, "cpp", _check_cpp, backward=_bwd_cpp)
def _fwd_cpp(rn, tn, rel, spu, present, inv_tau):
    return _stats_chunked(rn, tn, rel, spu, present, inv_tau, _stats_rows_cpp)


def _bwd_triton(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau):
    from vlmfast.kernels.region_loss import region_loss_dsim

    B, R, D = rn.shape
    ds = region_loss_dsim(rn, tn, spu, am, dm, za, ga, sarg, dsmax, inv_tau).view(B * R, -1)
    drn = torch.mm(ds, tn).view(B, R, D)
    dtn = torch.mm(ds.t(), rn.reshape(B * R, D))
    return drn.mul_(inv_tau), dtn.mul_(inv_tau)


@_dispatch.register(OP, "triton", _check_dtypes, module="vlmfast.kernels.region_loss", backward=_bwd_triton)
def _fwd_triton(rn, tn, rel, spu, present, inv_tau):
    from vlmfast.kernels.region_loss import region_loss_stats

    return region_loss_stats(rn, tn, rel, spu, present, inv_tau)


# ----------------------------------------------------------------------------------------------------------
# Shared math: masks, normalisation, the O(B C) assembly of the loss and of its backward
# ----------------------------------------------------------------------------------------------------------


def _masks(labels: Tensor, relevant: Tensor, spurious: Tensor, C: int):
    """``(y, rel, spu, present, has)``: labels clamped into [0, C), relevant minus spurious (spurious wins), the
    (C,) classes of Y_B and the (B,) images with a relevant region."""
    y = labels.clamp(0, C - 1)
    rel = relevant & ~spurious
    present = torch.zeros(C, dtype=torch.bool, device=labels.device)
    present[y] = True
    return y, rel, spurious, present, rel.any(dim=1)


def _prepare(regions: Tensor, text: Tensor, normalize: bool):
    if normalize:
        rn, rnorm = normalized(regions)
        tn, tnorm = normalized(text)
        return rn, rnorm, tn, tnorm
    return regions.float(), None, text.float(), None


def _assemble(m, sl, smax, y, spu, present, has):
    """The per-image ``(L_R, L_A)`` and the denominators ``(zr, za)`` (log of the bracket of L_R and of L_A; 0
    outside H)."""
    B, C = m.shape
    classes = torch.arange(C, device=m.device)
    my = m.gather(1, y.unsqueeze(1)).squeeze(1)
    q = torch.logsumexp(smax.masked_fill(~spu, -_INF).reshape(-1), dim=0)  # sum over S_B of exp best-match
    zr = torch.logaddexp(torch.logsumexp(m.masked_fill(~present, -_INF), dim=1), q)
    other = has.unsqueeze(1) & (y.unsqueeze(1) != classes)  # j in H, y_j != c
    n_c = torch.logaddexp(torch.logsumexp(m.masked_fill(~other, -_INF), dim=0), torch.logsumexp(sl, dim=0))
    za = torch.logaddexp(my, n_c[y])
    zero = torch.zeros_like(my)
    zr, za, my = torch.where(has, zr, zero), torch.where(has, za, zero), torch.where(has, my, zero)
    return zr - my, za - my, zr, za


def _assemble_backward(grad_r, grad_a, m, smax, zr, za, y, spu, present, has):
    """``(dm (B, C), za_c (C,), ga_c (C,), dsmax (B, R))`` for the backend's backward pass."""
    B, C = m.shape
    classes = torch.arange(C, device=m.device)
    zero = torch.zeros_like(zr)
    wr = torch.where(has, grad_r.float(), zero)
    wa = torch.where(has, grad_a.float(), zero)
    h = has.unsqueeze(1)
    # L_R: softmax over {m_i(y): y in Y_B} and the spurious best matches; -m_i(y_i) in both terms
    dm = torch.where(present & h, torch.exp((m - zr.unsqueeze(1)).clamp_max(0.0)), 0.0) * wr.unsqueeze(1)
    my = m.gather(1, y.unsqueeze(1)).squeeze(1)
    own = torch.where(has, torch.exp((my - za).clamp_max(0.0)), zero)
    dm.scatter_add_(1, y.unsqueeze(1), (wa * own - wr - wa).unsqueeze(1))
    zref = torch.where(has, zr, torch.full_like(zr, _INF)).amin()
    zref = torch.where(torch.isfinite(zref), zref, torch.zeros_like(zref))
    k = (wr * torch.where(has, torch.exp((zref - zr).clamp_max(0.0)), zero)).sum()
    dsmax = torch.where(spu, k * torch.exp((smax - zref).clamp_max(0.0)), 0.0)
    # L_A: per class c, the images i of H with y_i = c share every term but their own m_i(c)
    za_c = torch.full((C,), _INF, dtype=torch.float32, device=m.device)
    za_c = za_c.scatter_reduce(0, y, torch.where(has, za, torch.full_like(za, _INF)), "amin", include_self=True)
    ea = torch.where(has, torch.exp((za_c[y] - za).clamp_max(0.0)), zero)
    ga_c = torch.zeros(C, dtype=torch.float32, device=m.device).index_add_(0, y, wa * ea)
    other = h & (y.unsqueeze(1) != classes)
    dm = dm + torch.where(other, torch.exp((m - za_c).clamp_max(0.0)) * ga_c, 0.0)
    return dm, za_c, ga_c, dsmax


# ----------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmfast::region_loss", mutates_args=())
def _region_loss_op(regions: Tensor, text: Tensor, labels: Tensor, relevant: Tensor, spurious: Tensor,
                    temperature: float, normalize: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss_r (B,), loss_a (B,), has (B,) bool, m (B, C), am (B, C) int64, smax (B, R), sarg (B, R) int64,
    zr (B,), za (B,))``: the per-image losses, then what the backward needs."""
    impl = _dispatch.select(OP, backend or None, regions=regions, text=text)
    C = text.shape[0]
    y, rel, spu, present, has = _masks(labels, relevant, spurious, C)
    rn, _, tn, _ = _prepare(regions, text, normalize)
    m, am, sl, smax, sarg = impl.forward(rn, tn, rel, spu, present, 1.0 / temperature)
    loss_r, loss_a, zr, za = _assemble(m, sl, smax, y, spu, present, has)
    return loss_r, loss_a, has, m, am, smax, sarg, zr, za


@_region_loss_op.register_fake
def _region_loss_fake(regions, text, labels, relevant, spurious, temperature, normalize, backend):
    B, R, _ = regions.shape
    C = text.shape[0]
    v = regions.new_empty(B, dtype=torch.float32)
    return (v, torch.empty_like(v), regions.new_empty(B, dtype=torch.bool),
            regions.new_empty(B, C, dtype=torch.float32), regions.new_empty(B, C, dtype=torch.int64),
            regions.new_empty(B, R, dtype=torch.float32), regions.new_empty(B, R, dtype=torch.int64),
            torch.empty_like(v), torch.empty_like(v))


@torch.library.custom_op("vlmfast::region_loss_backward", mutates_args=())
def _region_loss_backward_op(grad_r: Tensor, grad_a: Tensor, regions: Tensor, text: Tensor, labels: Tensor,
                             relevant: Tensor, spurious: Tensor, m: Tensor, am: Tensor, smax: Tensor, sarg: Tensor,
                             zr: Tensor, za: Tensor, temperature: float, normalize: bool,
                             backend: str) -> tuple[Tensor, Tensor]:
    """``(d regions, d text)`` in the input dtypes."""
    impl = _dispatch.select(OP, backend or None, regions=regions, text=text)
    C = text.shape[0]
    y, rel, spu, present, has = _masks(labels, relevant, spurious, C)
    dm, za_c, ga_c, dsmax = _assemble_backward(grad_r, grad_a, m, smax, zr, za, y, spu, present, has)
    rn, rnorm, tn, tnorm = _prepare(regions, text, normalize)
    drn, dtn = impl.backward(rn, tn, spu, am, dm, za_c, ga_c, sarg, dsmax, 1.0 / temperature)
    if normalize:
        drn = normalize_backward(drn, rn, rnorm)
        dtn = normalize_backward(dtn, tn, tnorm)
    return drn.to(regions.dtype), dtn.to(text.dtype)


@_region_loss_backward_op.register_fake
def _region_loss_backward_fake(grad_r, grad_a, regions, text, labels, relevant, spurious, m, am, smax, sarg, zr,
                               za, temperature, normalize, backend):
    return torch.empty_like(regions, memory_format=torch.contiguous_format), \
        torch.empty_like(text, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    regions, text, labels, relevant, spurious, temperature, normalize, backend = inputs
    ctx.save_for_backward(regions, text, labels, relevant, spurious, *output[3:])
    ctx.temperature, ctx.normalize, ctx.backend = temperature, normalize, backend
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, grad_r, grad_a, *_rest):
    regions, text, labels, relevant, spurious, m, am, smax, sarg, zr, za = ctx.saved_tensors
    grad_r = torch.zeros_like(zr) if grad_r is None else grad_r
    grad_a = torch.zeros_like(zr) if grad_a is None else grad_a
    dr, dt = torch.ops.vlmfast.region_loss_backward(grad_r, grad_a, regions, text, labels, relevant, spurious, m, am,
                                                    smax, sarg, zr, za, ctx.temperature, ctx.normalize, ctx.backend)
    return dr, dt, None, None, None, None, None, None


_region_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def _check_mask(t: Any, name: str, B: int, R: int, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a bool tensor of shape ({B}, {R}), got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {t.dtype}")
    if tuple(t.shape) != (B, R):
        raise ValueError(f"{name}: expected shape ({B}, {R}) (one flag per region of regions), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected on regions' device {device}, got {t.device}")
    return t


def check_inputs(regions: Any, text: Any, labels: Any, relevant: Any, spurious: Any, temperature: Any,
                 normalize: Any, reduction: Any) -> tuple:
    """Metadata checks (no host sync): TypeError/ValueError naming the argument, the expected and the actual.
    Returns ``(regions, text, labels (int64), relevant, spurious, temperature (float))``."""
    for name, t, shape, dim in (("regions", regions, "(B, R, D)", 3), ("text", text, "(C, D)", 2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor of shape {shape}, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name}: expected a tensor with data (CPU or CUDA), got a meta tensor")
    B, R, D = regions.shape
    C, Dt = text.shape
    if B < 1 or R < 1 or D < 1:
        raise ValueError(f"regions: expected B, R, D >= 1, got shape {tuple(regions.shape)}")
    if C < 1 or Dt != D:
        raise ValueError(f"text: expected shape (C >= 1, {D}) (D of regions {tuple(regions.shape)}), got "
                         f"{tuple(text.shape)}")
    if text.device != regions.device:
        raise ValueError(f"text: expected on regions' device {regions.device}, got {text.device}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected an integer tensor of shape ({B},), got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels: expected an integer dtype (int64), got {labels.dtype}")
    if tuple(labels.shape) != (B,):
        raise ValueError(f"labels: expected shape ({B},) (one class per image), got {tuple(labels.shape)}")
    if labels.device != regions.device:
        raise ValueError(f"labels: expected on regions' device {regions.device}, got {labels.device}")
    relevant = _check_mask(relevant, "relevant", B, R, regions.device)
    spurious = _check_mask(spurious, "spurious", B, R, regions.device)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < _INF):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction: expected a str ('mean', 'sum' or 'none'), got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    return regions, text, labels.to(torch.int64).contiguous(), relevant, spurious, float(temperature)


def _raise_bad_labels(labels: Tensor, c: int) -> None:
    bad = (labels < 0) | (labels >= c)
    if bool(bad.any()):  # the one host sync
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: expected values in [0, {c}) (C = {c} classes), got {int(labels[n])} at image {n}")


def _reduce(per_image: Tensor, has: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.sum() / has.sum().clamp_min(1)


def region_loss(
    regions: Tensor,
    text: Tensor,
    labels: Tensor,
    relevant: Tensor,
    spurious: Tensor,
    *,
    temperature: float = 0.07,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str | None = None,
    validate_args: bool = True,
) -> RegionLossOutput:
    """RaVL's region-aware loss ``L_R + L_A`` (module docs).

    Args:
        regions: ``(B, R, D)`` region embeddings (padded), float32/float16/bfloat16, any strides; differentiable.
        text: ``(C, D)`` class text embeddings (differentiable; usually frozen).
        labels: ``(B,)`` integer class of each image, in ``[0, C)``.
        relevant, spurious: ``(B, R)`` bool region kinds (neither: padding; both: spurious).
        temperature: tau > 0 (sim = cos / tau when normalised).
        normalize: L2-normalise regions and text first (``F.normalize``).
        reduction: ``"mean"`` over the images with a relevant region (0 when there is none), ``"sum"`` or
            ``"none"`` (``(B,)``, 0 for images without a relevant region).
        backend: force ``"triton"``, ``"cpp"`` or ``"torch"`` (default: the first that can run; also
            ``VLMFAST_BACKEND``). Forward and backward run on the same backend.
        validate_args: check the label values (one host sync); ``False``: out-of-range labels are clamped.

    Returns: :class:`RegionLossOutput` ``(loss, relevance_loss, attribute_loss, has_relevant)``.
    """
    regions, text, y, relevant, spurious, tau = check_inputs(regions, text, labels, relevant, spurious, temperature,
                                                             normalize, reduction)
    compiling = torch.compiler.is_compiling()
    if validate_args and not compiling:
        _raise_bad_labels(y, text.shape[0])
    name = (backend or "") if compiling else _dispatch.choose(OP, backend, regions=regions, text=text)
    loss_r, loss_a, has, *_ = torch.ops.vlmfast.region_loss(regions, text, y, relevant, spurious, tau, normalize,
                                                            name)
    return RegionLossOutput(_reduce(loss_r + loss_a, has, reduction), loss_r, loss_a, has)


def region_loss_ref(regions: Tensor, text: Tensor, labels: Tensor, relevant: Tensor, spurious: Tensor, *,
                    temperature: float = 0.07, normalize: bool = True, reduction: str = "mean") -> RegionLossOutput:
    """The plain formula with autograd (a loop over the images; ``torch.max`` picks the first maximum): the tests'
    oracle and a readable restatement of the module docs. Importable without Triton or the extension."""
    regions, text, y, relevant, spurious, tau = check_inputs(regions, text, labels, relevant, spurious, temperature,
                                                             normalize, reduction)
    B, R, _ = regions.shape
    r, t = regions.float(), text.float()
    if normalize:
        r, t = F.normalize(r, dim=-1), F.normalize(t, dim=-1)
    sim = torch.einsum("brd,cd->brc", r, t) / tau  # (B, R, C)
    rel = relevant & ~spurious  # spurious wins
    has = rel.any(dim=1)
    present = torch.unique(y)  # Y_B
    spu_sim = sim[spurious]  # (S, C): S_B pooled
    spu_best = spu_sim[:, present].max(dim=1).values  # max_{y in Y_B} sim(r, y), (S,)
    m = {i: sim[i][rel[i]].max(dim=0).values for i in range(B) if bool(has[i])}  # m_i(.), (C,)
    zero = 0.0 * sim.sum()  # 0 with a (zero) gradient path: an all-padding batch still backpropagates
    lr, la = [], []
    for i in range(B):
        if i not in m:
            lr.append(zero)
            la.append(zero)
            continue
        yi = int(y[i])
        mi = m[i]
        lr.append(-mi[yi] + torch.logsumexp(torch.cat([mi[present], spu_best]), dim=0))
        others = [m[j][yi:yi + 1] for j in m if int(y[j]) != yi]
        la.append(-mi[yi] + torch.logsumexp(torch.cat([mi[yi:yi + 1], *others, spu_sim[:, yi]]), dim=0))
    loss_r, loss_a = torch.stack(lr), torch.stack(la)
    return RegionLossOutput(_reduce(loss_r + loss_a, has, reduction), loss_r, loss_a, has)


__all__ = ["RegionLossOutput", "region_loss", "region_loss_ref"]
