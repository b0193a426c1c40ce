"""Loads the compiled module ``vlmfast._C`` without ever breaking ``import vlmfast``.

A missing or broken binary is logged once (logger ``vlmfast``) and the ``cpp``/``cuda`` backends then report
themselves unavailable, with the import error as the reason. Tensors cross into the module as descriptors built
by :func:`tensor_view`; the caller keeps the tensors alive for the duration of the call.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

logger = logging.getLogger("vlmfast")

# Keep in sync with csrc/tensor.h::DType.
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.uint8: 6,
    torch.bool: 7,
    torch.int16: 8,
    torch.int8: 9,
}


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from vlmfast import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an OSError from a broken binary
        reason = f"vlmfast._C could not be imported ({type(exc).__name__}: {exc})"
        logger.warning("%s; the cpp and cuda backends are disabled", reason)
        return None, reason
    return _C, None


def get_C() -> ModuleType | None:
    """The compiled module, or None when it is missing or broken."""
    return _load()[0]


def C_error() -> str | None:
    """Why the compiled module is unavailable (None when it loaded)."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def cuda_runtime() -> tuple[int, str]:
    """(device count, error) as the CUDA runtime linked into vlmfast._C sees it."""
    C = get_C()
    if C is None:
        return 0, C_error() or "vlmfast._C unavailable"
    if not C.build_info().get("cuda", False):
        return 0, "vlmfast._C was built without CUDA (no nvcc at build time)"
    count, err = C.cuda_device_count()
    return int(count), str(err)


def tensor_view(t: torch.Tensor | None):
    """Descriptor (data_ptr, dtype code, sizes, strides, device) of a tensor; None stays None."""
    if t is None:
        return None
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"vlmfast._C does not handle dtype {t.dtype}")
    device = -1 if t.device.type == "cpu" else (t.device.index if t.device.index is not None else 0)
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], tuple(t.shape), tuple(t.stride()), device)
