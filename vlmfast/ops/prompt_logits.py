"""The op ``prompt_logits``: a fused CLIP prompt-logit head — normalize, ``X @ W^T * s``, softmax cross-entropy —
with a backward pass into the image features, the class (text) features and the logit scale.

Inputs: image features ``x (N, D)`` and class text features ``w (C, D)``, both **unnormalized**, float32 /
float16 / bfloat16 (they may differ), any strides; the logit scale ``s``, a one-element float tensor (it may
require grad) holding the **multiplier** (``model.logit_scale.exp()``, 100 for OpenAI CLIP); labels ``y (N,)``.
Every backend computes, in float32:

* ``xn = x / max(||x||, 1e-12)``, ``wn = w / max(||w||, 1e-12)`` (exactly ``torch.nn.functional.normalize``),
  ``z = s * xn @ wn^T``, ``lse_n = logsumexp_c z_nc``;
* per row: the cross-entropy with label smoothing ``eps`` (as ``torch.nn.functional.cross_entropy``)
  ``loss_n = (1 - eps) (lse_n - z_{n,y_n}) + eps (lse_n - mean_c z_nc)``, 0 for rows whose label is
  ``ignore_index``; the max-probability confidence ``exp(max_c z_nc - lse_n)``; the argmax (ties to the lowest
  class index, as ``torch.argmax``); correct = argmax == label.

Backward (recomputed from the saved ``lse``, never from stored logits): ``dz = g_n (softmax - (1-eps) onehot(y)
- eps/C)``, ``dxn = s dz wn``, ``dwn = s dz^T xn``, ``ds = sum(dz * xn wn^T)``, then through the normalization
``dx = (dxn - xn <xn, dxn>) / ||x||`` (``dxn / 1e-12`` where the clamp is active, as autograd of F.normalize).
Only the loss is differentiable; ``lse``, confidence and prediction are marked non-differentiable.

**Backends.** ``triton`` (``kernels/prompt_logits.py``): one kernel per row block tiles ``X W^T`` over C and D with
the normalization and an online max/sum fused in, so the ``N x C`` logits are never written in the forward pass;
its backward recomputes the tiles. ``cpp``: the GEMM by torch's BLAS on row chunks of at most ``CHUNK_ELEMS``
logits, everything else (softmax statistics, loss, argmax, and in the backward ``dz`` in place) in one pass per
row by the OpenMP kernels of ``csrc/prompt_logits.cpp`` — the extension links no BLAS, so this is the fast CPU
shape (as Liger's fused linear cross-entropy uses cuBLAS plus a row kernel). ``torch``: :func:`prompt_logits_ref`,
the same chunked math in plain torch, the CPU/GPU fallback and the test oracle's twin (the tests compare every
backend with autograd through ``F.normalize`` / ``F.cross_entropy``).

Layers (``docs/adding_an_op.md``): backend forward+backward pairs registered with :mod:`vlmfast._dispatch`, behind
``torch.ops.vlmfast.prompt_logits`` / ``torch.ops.vlmfast.prompt_logits_backward`` (custom ops with fake
implementations, connected by ``register_autograd``), behind the functionals :func:`prompt_logits` and
:func:`prompt_logits_loss` and the module :class:`PromptLogitsLoss`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmfast import _dispatch
from vlmfast._C_loader import get_C, tensor_view
from vlmfast.ops._features import EPS, FLOAT_DTYPES, check_features, normalize_backward, normalized

OP = "prompt_logits"
CHUNK_ELEMS = 1 << 22  # logits per row chunk on the chunked backends (16 MB of float32)
REDUCTIONS = ("mean", "sum", "none")


def _probe(device: str) -> dict[str, Any]:
    return {"x": torch.empty(1, 4, device=device), "w": torch.empty(2, 4, device=device)}


_dispatch.define_op(OP, device_arg="x", probe=_probe, differentiable=True, module=__name__)


class PromptLogitsOutput(NamedTuple):
    """What :func:`prompt_logits` returns. ``loss``: reduced as asked (``(N,)`` for ``reduction="none"``);
    ``confidence`` float32, ``prediction`` int64, ``correct`` bool and ``lse`` float32 are ``(N,)``."""

    loss: Tensor
    confidence: Tensor
    prediction: Tensor
    correct: Tensor
    lse: Tensor


# ----------------------------------------------------------------------------------------------------------
# Shared math of the chunked backends (torch reference and cpp): normalization and the driver loops
# ----------------------------------------------------------------------------------------------------------


_normalized, _normalize_backward = normalized, normalize_backward


def _rows(n: int, c: int) -> int:
    return max(1, CHUNK_ELEMS // max(c, 1))


def _forward_chunked(x, w, scale, labels, eps, ignore_index, rows_fwd: Callable) -> tuple[Tensor, ...]:
    N, C = x.shape[0], w.shape[0]
    xn, _ = _normalized(x)
    wn, _ = _normalized(w)
    s = scale.float().reshape(())
    loss = x.new_empty(N, dtype=torch.float32)
    lse = torch.empty_like(loss)
    conf = torch.empty_like(loss)
    pred = x.new_empty(N, dtype=torch.int64)
    step = _rows(N, C)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = torch.mm(xn[r0:r1], wn.t()).mul_(s)
        rows_fwd(z, labels[r0:r1], eps, ignore_index, loss[r0:r1], lse[r0:r1], conf[r0:r1], pred[r0:r1])
    return loss, lse, conf, pred


def _backward_chunked(grad, x, w, scale, labels, lse, eps, ignore_index, rows_bwd: Callable) -> tuple[Tensor, ...]:
    N, C = x.shape[0], w.shape[0]
    xn, xnorm = _normalized(x)
    wn, wnorm = _normalized(w)
    s = scale.float().reshape(())
    g = grad.float()
    dxn = torch.empty_like(xn)
    dwn = torch.zeros_like(wn)
    step = _rows(N, C)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = torch.mm(xn[r0:r1], wn.t()).mul_(s)
        rows_bwd(z, lse[r0:r1], labels[r0:r1], g[r0:r1], eps, ignore_index)  # z := dz in place
        torch.mm(z, wn, out=dxn[r0:r1])  # dz @ wn  (times s below)
        dwn.addmm_(z.t(), xn[r0:r1])
    dscale = (dxn * xn).sum()  # sum(dz * cos) = sum_n <xn_n, dz_n @ wn>
    dxn.mul_(s)
    dwn.mul_(s)
    dx = _normalize_backward(dxn, xn, xnorm).to(x.dtype)
    dw = _normalize_backward(dwn, wn, wnorm).to(w.dtype)
    return dx, dw, dscale.to(scale.dtype).reshape(scale.shape)


def _valid_rows(labels: Tensor, c: int, ignore_index: int) -> Tensor:
    return (labels != ignore_index) & (labels >= 0) & (labels < c)


def _rows_fwd_torch(z, labels, eps, ignore_index, loss, lse, conf, pred):
    C = z.shape[1]
    valid = _valid_rows(labels, C, ignore_index)
    y = torch.where(valid, labels, torch.zeros_like(labels))
    am = z.argmax(dim=1)  # ties to the lowest index (torch.max's index on ties is not guaranteed)
    mx = z.gather(1, am.unsqueeze(1)).squeeze(1)
    out_lse = mx + torch.log(torch.exp(z - mx.unsqueeze(1)).sum(dim=1))
    zy = z.gather(1, y.unsqueeze(1)).squeeze(1)
    row = (1.0 - eps) * (out_lse - zy)
    if eps:
        row = row + eps * (out_lse - z.mean(dim=1))
    loss.copy_(torch.where(valid, row, torch.zeros_like(row)))
    lse.copy_(out_lse)
    conf.copy_(torch.exp(mx - out_lse))
    pred.copy_(am)


def _rows_bwd_torch(z, lse, labels, grad, eps, ignore_index):
    C = z.shape[1]
    valid = _valid_rows(labels, C, ignore_index)
    y = torch.where(valid, labels, torch.zeros_like(labels))
    z.sub_(lse.unsqueeze(1)).exp_()
    if eps:
        z.sub_(eps / C)
    z.scatter_add_(1, y.unsqueeze(1), torch.full_like(y, -(1.0 - eps), dtype=z.dtype).unsqueeze(1))
    z.mul_(torch.where(valid, grad, torch.zeros_like(grad)).unsqueeze(1))


# ----------------------------------------------------------------------------------------------------------
# Backends: forward returns (loss, lse, conf, pred); backward returns (dx, dw, dscale)
# ----------------------------------------------------------------------------------------------------------


def _bwd_torch(grad, x, w, scale, labels, lse, eps, ignore_index):
    return _backward_chunked(grad, x, w, scale, labels, lse, eps, ignore_index, _rows_bwd_torch)


@_dispatch.register(OP, "torch", backward=_bwd_torch)
def _fwd_torch(x, w, scale, labels, eps, ignore_index):
    return _forward_chunked(x, w, scale, labels, eps, ignore_index, _rows_fwd_torch)


def _check_cpp(x: Tensor, w: Tensor, **_) -> list[str]:
    reasons = []
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in FLOAT_DTYPES:
            reasons.append(f"{name}: dtype {t.dtype} unsupported (float32, float16, bfloat16)")
    return reasons


def _check_cpp_built(x: Tensor, w: Tensor, **_) -> list[str]:
    reasons = _check_cpp(x, w)
    try:
        if not hasattr(get_C(), "prompt_logits_rows_fwd"):
            reasons.append("the built extension has no prompt_logits kernels (rebuild: pip install -e .)")
    except Exception as exc:  # the backend's own availability reports a missing extension
        reasons.append(str(exc))
    return reasons


def _rows_fwd_cpp(z, labels, eps, ignore_index, loss, lse, conf, pred):
    get_C().prompt_logits_rows_fwd(tensor_view(z), tensor_view(labels), float(eps), int(ignore_index),
                                   tensor_view(loss), tensor_view(lse), tensor_view(conf), tensor_view(pred),
                                   torch.get_num_threads())


def _rows_bwd_cpp(z, lse, labels, grad, eps, ignore_index):
    get_C().prompt_logits_rows_bwd(tensor_view(z), tensor_view(lse), tensor_view(labels), tensor_view(grad.contiguous()),
                                   float(eps), int(ignore_index), torch.get_num_threads())


def _bwd_cpp(grad, x, w, scale, labels, lse, eps, ignore_index):
    return _backward_chunked(grad, x, w, scale, labels, lse, eps, ignore_index, _rows_bwd_cpp)


@_dispatch.register(OP, "cpp", _check_cpp_built, backward=_bwd_cpp)
def _fwd_cpp(x, w, scale, labels, eps, ignore_index):
    return _forward_chunked(x, w, scale, labels, eps, ignore_index, _rows_fwd_cpp)


def _check_triton(x: Tensor, w: Tensor, **_) -> list[str]:
    return _check_cpp(x, w)


def _bwd_triton(grad, x, w, scale, labels, lse, eps, ignore_index):
    from vlmfast.kernels.prompt_logits import prompt_logits_backward

    dx, dw, ds = prompt_logits_backward(grad.float().contiguous(), x, w, scale.float().reshape(()), labels, lse,
                                        float(eps), int(ignore_index))
    return dx.to(x.dtype), dw.to(w.dtype), ds.to(scale.dtype).reshape(scale.shape)


@_dispatch.register(OP, "triton", _check_triton, module="vlmfast.kernels.prompt_logits", backward=_bwd_triton)
def _fwd_triton(x, w, scale, labels, eps, ignore_index):
    from vlmfast.kernels.prompt_logits import prompt_logits_forward

    return prompt_logits_forward(x, w, scale.float().reshape(()), labels, float(eps), int(ignore_index))


# ----------------------------------------------------------------------------------------------------------
# torch.library ops (dispatch inside; fakes for compile; autograd connects forward and backward)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmfast::prompt_logits", mutates_args=())
def _prompt_logits_op(x: Tensor, w: Tensor, scale: Tensor, labels: Tensor, label_smoothing: float,
                      ignore_index: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss_rows, lse, conf, pred)``, each ``(N,)``, for validated 2-D ``x``, ``w``, 0-d ``scale``, ``(N,)`` labels."""
    impl = _dispatch.select(OP, backend or None, x=x, w=w)
    return tuple(t.clone() if t._base is not None else t for t in impl.forward(x, w, scale, labels,
                                                                               label_smoothing, ignore_index))


@_prompt_logits_op.register_fake
def _prompt_logits_fake(x, w, scale, labels, label_smoothing, ignore_index, backend):
    N = x.shape[0]
    f = x.new_empty(N, dtype=torch.float32)
    return f, torch.empty_like(f), torch.empty_like(f), x.new_empty(N, dtype=torch.int64)


@torch.library.custom_op("vlmfast::prompt_logits_backward", mutates_args=())
def _prompt_logits_backward_op(grad: Tensor, x: Tensor, w: Tensor, scale: Tensor, labels: Tensor, lse: Tensor,
                               label_smoothing: float, ignore_index: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _dispatch.select(OP, backend or None, x=x, w=w)
    return impl.backward(grad, x, w, scale, labels, lse, label_smoothing, ignore_index)


@_prompt_logits_backward_op.register_fake
def _prompt_logits_backward_fake(grad, x, w, scale, labels, lse, label_smoothing, ignore_index, backend):
    return torch.empty_like(x), torch.empty_like(w), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, w, scale, labels, label_smoothing, ignore_index, backend = inputs
    ctx.save_for_backward(x, w, scale, labels, output[1])
    ctx.label_smoothing = label_smoothing
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _backward(ctx, grad_loss, _g_lse, _g_conf, _g_pred):
    x, w, scale, labels, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dx, dw, dscale = torch.ops.vlmfast.prompt_logits_backward(
        grad_loss.contiguous(), x, w, scale, labels, lse, ctx.label_smoothing, ctx.ignore_index, ctx.backend)
    return dx, dw, dscale, None, None, None, None


_prompt_logits_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------


def _check_features(t: Any, name: str) -> Tensor:
    return check_features(t, name)


def check_inputs(x: Any, w: Any, scale: Any, labels: Any, label_smoothing: Any, ignore_index: Any,
                 reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor, Tensor, float, int]:
    """Metadata checks (no host sync); returns ``(x, w, scale (0-d), labels (N,) int64, eps, ignore_index)``."""
    x = _check_features(x, "image_features")
    w = _check_features(w, "text_features")
    N, D = x.shape
    C = w.shape[0]
    if w.shape[1] != D:
        raise ValueError(f"text_features: expected feature width D = {D} (image_features {tuple(x.shape)}), "
                         f"got {tuple(w.shape)}")
    if N == 0 or C == 0 or D == 0:
        raise ValueError(f"image_features/text_features: expected N, C, D >= 1, got N = {N}, C = {C}, D = {D}")
    if w.device != x.device:
        raise ValueError(f"text_features: expected on the image features' device {x.device}, got {w.device}")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = torch.tensor(float(scale), device=x.device)
    if not isinstance(scale, Tensor):
        raise TypeError(f"logit_scale: expected a float or a one-element tensor, got {type(scale).__name__}")
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"logit_scale: expected a one-element float tensor (the multiplier, e.g. "
                         f"model.logit_scale.exp()), got shape {tuple(scale.shape)} {scale.dtype}")
    if scale.device != x.device:
        raise ValueError(f"logit_scale: expected on the features' device {x.device}, got {scale.device}")
    scale = scale.reshape(())
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if labels is None:
        labels = torch.full((N,), ignore_index, dtype=torch.int64, device=x.device)
    else:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected an integer tensor or None, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != (N,):
            raise ValueError(f"labels: expected shape ({N},) to match image_features, got {tuple(labels.shape)}")
        if labels.device != x.device:
            raise ValueError(f"labels: expected on the features' device {x.device}, got {labels.device}")
        labels = labels.to(torch.int64).contiguous()
    return x, w, scale, labels, float(label_smoothing), int(ignore_index)


def _raise_bad_labels(labels: Tensor, c: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= c)) & (labels != ignore_index)
    if bool(bad.any()):  # the one host sync
        n = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: expected values in [0, {c}) (C = {c} classes) or ignore_index = {ignore_index}, "
                         f"got {int(labels[n])} at sample {n}")


def prompt_logits(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    validate_args: bool = True,
) -> PromptLogitsOutput:
    """Fused prompt-logit head (module docs): loss plus per-row confidence, prediction and correctness.

    Args:
        image_features: ``(N, D)``, unnormalized, float32/float16/bfloat16, CPU or CUDA, any strides.
        text_features: ``(C, D)`` class features, unnormalized (gradients flow into them: the prompt learner's).
        logit_scale: the multiplier (``model.logit_scale.exp()``), a float or a one-element tensor that may
            require grad.
        labels: ``(N,)`` integer class ids, or None (no loss: ``loss`` is 0 / NaN for ``mean``; the per-row
            statistics are still computed). ``ignore_index`` rows count in no loss and get no gradient.
        label_smoothing: in [0, 1], as ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"`` over the non-ignored rows (as F.cross_entropy), ``"sum"`` or ``"none"`` (``(N,)``).
        backend: force ``"triton"``, ``"cpp"`` or ``"torch"`` (default: the first that can run; also
            ``VLMFAST_BACKEND``). Forward and backward run on the same backend.
        validate_args: check label values (one host sync); ``False``: out-of-range labels are treated as ignored.
    """
    x, w, scale, y, eps, ignore = check_inputs(image_features, text_features, logit_scale, labels, label_smoothing,
                                               ignore_index, reduction)
    compiling = torch.compiler.is_compiling()
    if validate_args and not compiling and labels is not None:
        _raise_bad_labels(y, w.shape[0], ignore)
    name = (backend or "") if compiling else _dispatch.choose(OP, backend, x=x, w=w)
    rows, lse, conf, pred = torch.ops.vlmfast.prompt_logits(x, w, scale, y, eps, ignore, name)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / _valid_rows(y, w.shape[0], ignore).sum()
    return PromptLogitsOutput(loss, conf, pred, pred == y, lse)


def prompt_logits_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    validate_args: bool = True,
) -> Tensor:
    """The cross-entropy of :func:`prompt_logits` only (same arguments; ``labels`` required). Equals
    ``F.cross_entropy(s * F.normalize(x) @ F.normalize(w).T, labels, label_smoothing=...)`` in value and gradients,
    without materialising the logits on the Triton path."""
    if labels is None:
        raise ValueError("labels: expected (N,) class ids for a loss, got None (use prompt_logits for statistics)")
    return prompt_logits(image_features, text_features, logit_scale, labels, label_smoothing=label_smoothing,
                         ignore_index=ignore_index, reduction=reduction, backend=backend,
                         validate_args=validate_args).loss


def prompt_logits_ref(image_features, text_features, logit_scale, labels, *, label_smoothing: float = 0.0,
                      ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The unfused torch formula (materialises the logits; autograd does the backward): the tests' oracle."""
    s = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
    z = s.float().reshape(()) * F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).t()
    return F.cross_entropy(z, labels, label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)


class PromptLogitsLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`prompt_logits_loss`: ``loss = module(image_features, text_features,
    logit_scale, labels)``."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                labels: Tensor) -> Tensor:
        return prompt_logits_loss(image_features, text_features, logit_scale, labels,
                                  label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
                                  reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
