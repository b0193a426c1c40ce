"""Helpers shared by the feature-space ops (``prompt_logits``, ``contrastive_loss``): input checks of a 2-D
feature matrix, ``F.normalize`` with its norms kept, and its backward (as autograd of ``F.normalize``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's clamp on the norm
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_features(t: Any, name: str, shape: str = "(rows, D)") -> Tensor:
    """``t`` if it is a 2-D float32/float16/bfloat16 tensor with data, else a TypeError/ValueError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (CPU or CUDA), got a meta tensor")
    return t


def normalized(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(t / max(||t||, eps), max(||t||, eps))`` in float32 (exactly ``F.normalize``)."""
    tf = t.float()
    norm = tf.norm(dim=-1).clamp_min(EPS)
    return tf / norm.unsqueeze(-1), norm


def normalize_backward(dn: Tensor, tn: Tensor, norm: Tensor) -> Tensor:
    """Gradient wrt ``t`` of ``tn = t / max(||t||, eps)`` given ``dn`` (autograd of F.normalize, clamp included)."""
    proj = dn - tn * (tn * dn).sum(dim=-1, keepdim=True)
    return torch.where((norm <= EPS).unsqueeze(-1), dn, proj) / norm.unsqueeze(-1)


def dtype_reasons(**tensors: Tensor) -> list[str]:
    """A backend check: the reasons (one per tensor) a dtype is not float32/float16/bfloat16."""
    return [f"{n}: dtype {t.dtype} unsupported (float32, float16, bfloat16)"
            for n, t in tensors.items() if t.dtype not in FLOAT_DTYPES]
