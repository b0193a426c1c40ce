"""The one dispatcher: picks a backend for each op call and explains why the others cannot run it.

Backends, in default order:

==========  =====================================================  ==========================================
name        what                                                   runs on
==========  =====================================================  ==========================================
``triton``  Triton kernels in ``vlmfast.kernels``                  CUDA tensors; CPU tensors when
                                                                   ``TRITON_INTERPRET=1`` (how CI tests them)
``cuda``    CUDA kernels in the extension ``vlmfast._C``           CUDA tensors
``cpp``     OpenMP kernels in the extension ``vlmfast._C``         CPU tensors
``torch``   the reference implementation (also the test oracle)    anywhere
==========  =====================================================  ==========================================

Each op registers one implementation per backend with :func:`register`, together with a function returning the
*reasons* it cannot run given inputs (an empty list means it can). :func:`select` takes the first backend whose
global and input reasons are both empty. ``backend=`` or the environment variable ``VLMFAST_BACKEND`` forces one;
a forced backend that cannot run raises :class:`BackendError` listing every backend's reasons — never a silent
fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vlmfast._C_loader import C_error, cuda_runtime, get_C

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")

BACKEND_DESCRIPTIONS = {
    "triton": "Triton kernels (vlmfast.kernels) on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1",
    "cuda": "CUDA kernels in the compiled extension vlmfast._C",
    "cpp": "OpenMP CPU kernels in the compiled extension vlmfast._C",
    "torch": "torch reference implementation (runs anywhere; the test oracle)",
}


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1): CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _kernel_import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{module} failed to import ({type(exc).__name__}: {exc})"
    return None


def backend_reasons(name: str) -> list[str]:
    """Reasons the backend cannot run anything in this process (empty when it is available)."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return []
    if name == "triton":
        err = _triton_import_error()
        if err:
            return [err]
        if not triton_interpreting() and not torch.cuda.is_available():
            return ["no CUDA device is visible to torch and TRITON_INTERPRET=1 is not set"]
        return []
    C = get_C()
    if C is None:
        return [C_error() or "vlmfast._C is unavailable"]
    if name == "cpp":
        return []
    # cuda
    count, err = cuda_runtime()
    if count == 0:
        return [f"no CUDA device for vlmfast._C ({err})" if err else "no CUDA device for vlmfast._C"]
    return []


@dataclass(frozen=True)
class OpImpl:
    op: str
    backend: str
    fn: Callable[..., Any]
    check: Callable[..., list[str]]
    module: str | None = None  # imported lazily; its import error becomes a reason


_REGISTRY: dict[str, dict[str, OpImpl]] = {}


def register(op: str, backend: str, check: Callable[..., list[str]], module: str | None = None):
    """Decorator registering ``fn`` as the ``backend`` implementation of ``op``.

    ``check(**inputs)`` returns the reasons this implementation cannot run those inputs. ``module`` names a module
    (e.g. the Triton kernel file) whose import is attempted lazily; an import failure becomes a reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[backend] = OpImpl(op, backend, fn, check, module)
        return fn

    return deco


def list_ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> dict[str, OpImpl]:
    return dict(_impls(op))


def _impls(op: str) -> dict[str, OpImpl]:
    if op not in _REGISTRY:
        raise ValueError(f"op: expected one of {list_ops()}, got {op!r}")
    return _REGISTRY[op]


def _reasons(op: str, name: str, impl: OpImpl | None, inputs: dict[str, Any]) -> list[str]:
    """Why ``impl`` (the ``name`` backend of ``op``) cannot run ``inputs``: global reasons first, then its checks."""
    if impl is None:
        return [f"no {name} implementation of {op}"]
    reasons = list(backend_reasons(name))
    if not reasons and impl.module is not None:
        err = _kernel_import_error(impl.module)
        if err:
            reasons.append(err)
    if not reasons and inputs:
        reasons.extend(impl.check(**inputs))
    return reasons


def explain(op: str, **inputs: Any) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot run ``op`` on ``inputs`` (empty list: it can)."""
    impls = _impls(op)
    return {name: _reasons(op, name, impls.get(name), inputs) for name in BACKENDS}


def _format(op: str, reasons: dict[str, list[str]]) -> str:
    lines = []
    for name in BACKENDS:
        r = reasons.get(name, [])
        lines.append(f"  {name}: " + ("can run" if not r else "; ".join(r)))
    return "\n".join(lines)


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced by the argument, else by VLMFAST_BACKEND, else None. Validates the name."""
    name = backend if backend is not None else (os.environ.get("VLMFAST_BACKEND") or None)
    if name is None:
        return None
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        source = "backend" if backend is not None else "VLMFAST_BACKEND"
        raise ValueError(f"{source}: expected one of {BACKENDS} or 'auto', got {name!r}")
    return name


def select(op: str, backend: str | None = None, **inputs: Any) -> OpImpl:
    """The implementation of ``op`` to run on ``inputs``: the forced backend, else the first that can run it.
    Backends are checked in order and only until one can run; the full explanation is built for errors only."""
    forced = forced_backend(backend)
    impls = _impls(op)
    if forced is not None:
        if _reasons(op, forced, impls.get(forced), inputs):
            raise BackendError(f"{op}: the forced backend {forced!r} cannot run these inputs. Every backend:\n"
                               + _format(op, explain(op, **inputs)))
        return impls[forced]
    for name in BACKENDS:
        if not _reasons(op, name, impls.get(name), inputs):
            return impls[name]
    raise BackendError(f"{op}: no backend can run these inputs:\n{_format(op, explain(op, **inputs))}")
