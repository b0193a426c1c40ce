"""The one dispatcher: picks a backend for each op call and explains why the others cannot run it.

Two registries:

* **Backends** are objects (:class:`Backend`) that declare the device types they run on, their priority and
  their own process-wide availability. The built-in ones, in default order:

  ==========  =====================================================  ==========================================
  name        what                                                   runs on
  ==========  =====================================================  ==========================================
  ``triton``  Triton kernels in ``vlmfast.kernels``                  CUDA tensors; CPU tensors under
                                                                     ``TRITON_INTERPRET=1`` **only when forced**
  ``cuda``    CUDA kernels in the extension ``vlmfast._C``           CUDA tensors
  ``cpp``     OpenMP kernels in the extension ``vlmfast._C``         CPU tensors
  ``torch``   the reference implementation (also the test oracle)    anywhere
  ==========  =====================================================  ==========================================

  A new backend (FAISS for k-means, say) plugs in with :func:`register_backend` from its own module; nothing
  here changes.

* **Ops** are declared with :func:`define_op` (name, which argument carries the device, a probe for
  ``vlmfast info``) and each backend of an op registers its forward, and where the op is differentiable its
  backward, with :func:`register`, together with a ``check(**inputs)`` returning the *reasons* it cannot run
  given inputs (an empty list means it can).

:func:`select` takes the first backend, in priority order, whose backend-, device- and input-reasons are all
empty. ``backend=`` or the environment variable ``VLMFAST_BACKEND`` forces one; a forced backend that cannot run
raises :class:`BackendError` listing every backend's reasons — never a silent fallback. A secondary step of a
computation (e.g. the equal-mass bins after the logits pass) uses :func:`select_step`: it honours the forced
backend when that backend implements the step, and otherwise says why in a note that the caller puts into its
result.

The Triton interpreter (``TRITON_INTERPRET=1``) is a test vehicle: it runs the GPU kernels on CPU tensors, a few
milliseconds per tile step. It therefore never outranks ``cpp``/``torch`` on CPU tensors; it runs them only when
``triton`` is forced (which is how the tests exercise the kernels).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vlmfast._C_loader import C_error, cuda_runtime, get_C
from vlmfast.kernels._utils import interpreting as triton_interpreting

__all__ = [
    "Backend",
    "BackendError",
    "OpDef",
    "OpImpl",
    "backend_reasons",
    "choose",
    "define_op",
    "explain",
    "forced_backend",
    "get_backend",
    "get_op",
    "implementations",
    "list_backends",
    "list_ops",
    "load_ops",
    "probe_inputs",
    "register",
    "register_backend",
    "select",
    "select_step",
    "triton_interpreting",
]


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    ``devices``: the device types (``"cpu"``, ``"cuda"``) it runs on. ``priority``: lower runs first.
    ``availability()``: reasons it cannot run anything in this process (empty list: available), e.g. a missing
    library. ``device_reasons(device, forced)``: reasons it cannot run tensors on ``device``; the default says so
    when the device type is not in ``devices``. ``forced`` tells whether the caller forced this backend.
    """

    name: str
    description: str
    devices: tuple[str, ...]
    priority: int
    availability: Callable[[], list[str]] = field(default=lambda: [], compare=False, repr=False)
    device_check: Callable[[torch.device, bool], list[str]] | None = field(default=None, compare=False, repr=False)

    def reasons(self) -> list[str]:
        return list(self.availability())

    def device_reasons(self, device: torch.device, forced: bool = False) -> list[str]:
        if self.device_check is not None:
            return list(self.device_check(device, forced))
        if device.type not in self.devices:
            return [f"needs {' or '.join(d.upper() for d in self.devices)} tensors, got {device}"]
        return []


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the registry (``replace=True`` to redefine one). Returns it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a vlmfast._dispatch.Backend, got {type(backend).__name__}")
    if not backend.name or not backend.name.isidentifier() or backend.name == "auto":
        raise ValueError(f"backend.name: expected an identifier other than 'auto', got {backend.name!r}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"backend.name: {backend.name!r} is already registered (pass replace=True to redefine it)")
    _BACKENDS[backend.name] = backend
    _order.cache_clear()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (and every op implementation registered for it)."""
    get_backend(name)
    del _BACKENDS[name]
    for op in _OPS.values():
        op.impls.pop(name, None)
    _order.cache_clear()


@functools.lru_cache(maxsize=None)
def _order() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS, key=lambda n: (_BACKENDS[n].priority, n)))


def list_backends() -> tuple[str, ...]:
    """Names of the registered backends in default (priority) order."""
    return _order()


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {list_backends()}, got {name!r}")
    return _BACKENDS[name]


def backend_reasons(name: str) -> list[str]:
    """Reasons the backend cannot run anything in this process (empty when it is available)."""
    return get_backend(name).reasons()


# --- the built-in backends ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"
    return None


def _triton_availability() -> list[str]:
    err = _triton_import_error()
    if err:
        return [err]
    if not triton_interpreting() and not torch.cuda.is_available():
        return ["no CUDA device is visible to torch and TRITON_INTERPRET=1 is not set"]
    return []


def _triton_device(device: torch.device, forced: bool) -> list[str]:
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if not triton_interpreting():
            return ["needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, when forced)"]
        if not forced:
            return ["runs CPU tensors in the Triton interpreter (TRITON_INTERPRET=1) only when forced: "
                    "a test vehicle, not a fast path"]
        return []
    return [f"needs CUDA tensors, got {device}"]


def _compiled_availability(cuda: bool) -> Callable[[], list[str]]:
    def reasons() -> list[str]:
        if get_C() is None:
            return [C_error() or "vlmfast._C is unavailable"]
        if cuda:
            count, err = cuda_runtime()
            if count == 0:
                return [f"no CUDA device for vlmfast._C ({err})" if err else "no CUDA device for vlmfast._C"]
        return []

    return reasons


register_backend(Backend(
    "triton", "Triton kernels (vlmfast.kernels) on CUDA tensors; CPU tensors under TRITON_INTERPRET=1 when forced",
    ("cuda",), 10, _triton_availability, _triton_device))
register_backend(Backend("cuda", "CUDA kernels in the compiled extension vlmfast._C", ("cuda",), 20,
                         _compiled_availability(True)))
register_backend(Backend("cpp", "OpenMP CPU kernels in the compiled extension vlmfast._C", ("cpu",), 30,
                         _compiled_availability(False)))
register_backend(Backend("torch", "torch reference implementation (runs anywhere; the test oracle)",
                         ("cpu", "cuda"), 1000, device_check=lambda device, forced: []))

#: The built-in backends (the registry may hold more: see :func:`list_backends`).
BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")


# ----------------------------------------------------------------------------------------------------------
# Ops and their implementations
# ----------------------------------------------------------------------------------------------------------


def _no_reasons(**_: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of an op: ``forward`` and, for differentiable ops, ``backward``."""

    op: str
    backend: str
    forward: Callable[..., Any]
    check: Callable[..., list[str]] = _no_reasons
    module: str | None = None  # imported lazily; its import error becomes a reason
    backward: Callable[..., Any] | None = None


@dataclass
class OpDef:
    """An op: its name, the input whose device decides the backend, a probe for ``vlmfast info``, whether it is
    differentiable (then every implementation must register a backward), and its implementations."""

    name: str
    device_arg: str
    probe: Callable[[str], dict[str, Any]] | None = None
    differentiable: bool = False
    module: str | None = None  # where the op is defined (load_ops imports it)
    impls: dict[str, OpImpl] = field(default_factory=dict)


_OPS: dict[str, OpDef] = {}

#: Modules that define the package's ops (imported by :func:`load_ops`; each registers on import).
OP_MODULES = ("vlmfast.ops.calibration_bins", "vlmfast.ops.equal_mass_bins", "vlmfast.ops.prompt_logits",
              "vlmfast.ops.contrastive_loss", "vlmfast.ops.kmeans_assign", "vlmfast.ops.region_loss")


def define_op(name: str, *, device_arg: str, probe: Callable[[str], dict[str, Any]] | None = None,
              differentiable: bool = False, module: str | None = None) -> OpDef:
    """Declare an op (idempotent for the same name and device argument)."""
    if name in _OPS:
        op = _OPS[name]
        if op.device_arg != device_arg:
            raise ValueError(f"op {name!r}: already defined with device_arg={op.device_arg!r}, got {device_arg!r}")
        return op
    op = OpDef(name, device_arg, probe, differentiable, module)
    _OPS[name] = op
    return op


def register(op: str, backend: str, check: Callable[..., list[str]] | None = None, module: str | None = None,
             *, backward: Callable[..., Any] | None = None):
    """Decorator registering ``fn`` as the ``backend`` forward of ``op`` (declared with :func:`define_op`).

    ``check(**inputs)`` returns the reasons this implementation cannot run those inputs (device checks are the
    backend's business and need not be repeated). ``module`` names a module (e.g. the Triton kernel file) whose
    import is attempted lazily; an import failure becomes a reason. ``backward``: the backward of this backend,
    required for differentiable ops.
    """
    get_backend(backend)
    if op not in _OPS:
        raise ValueError(f"op: {op!r} is not defined; call define_op({op!r}, device_arg=...) first")
    definition = _OPS[op]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if definition.differentiable and backward is None:
            raise ValueError(f"register({op!r}, {backend!r}): the op is differentiable; pass backward=")
        definition.impls[backend] = OpImpl(op, backend, fn, check or _no_reasons, module, backward)
        return fn

    return deco


def load_ops() -> list[str]:
    """Import every op module of the package (each registers its op); returns the op names."""
    for mod in OP_MODULES:
        importlib.import_module(mod)
    return list_ops()


def list_ops() -> list[str]:
    return sorted(_OPS)


def get_op(op: str) -> OpDef:
    if op not in _OPS:
        raise ValueError(f"op: expected one of {list_ops()}, got {op!r}")
    return _OPS[op]


def implementations(op: str) -> dict[str, OpImpl]:
    return dict(get_op(op).impls)


def probe_inputs(op: str, device: str | torch.device) -> dict[str, Any]:
    """Small inputs of ``op`` on ``device`` (for ``vlmfast info``: which backend would such a call get)."""
    definition = get_op(op)
    if definition.probe is None:
        return {}
    return definition.probe(str(device))


@functools.lru_cache(maxsize=None)
def _kernel_import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{module} failed to import ({type(exc).__name__}: {exc})"
    return None


def _device_of(definition: OpDef, inputs: dict[str, Any]) -> torch.device | None:
    x = inputs.get(definition.device_arg)
    return x.device if isinstance(x, torch.Tensor) else None


def _reasons(definition: OpDef, name: str, inputs: dict[str, Any], forced: bool) -> list[str]:
    """Why the ``name`` backend cannot run ``definition`` on ``inputs``: backend, device, import, then input checks."""
    impl = definition.impls.get(name)
    if impl is None:
        return [f"no {name} implementation of {definition.name}"]
    backend = _BACKENDS[name]
    reasons = backend.reasons()
    if reasons:
        return reasons
    device = _device_of(definition, inputs)
    if device is not None:
        reasons = backend.device_reasons(device, forced)
        if reasons:
            return reasons
    if impl.module is not None:
        err = _kernel_import_error(impl.module)
        if err:
            return [err]
    return list(impl.check(**inputs)) if inputs else []


def explain(op: str, backend: str | None = None, **inputs: Any) -> dict[str, list[str]]:
    """For every backend (priority order), the reasons it cannot run ``op`` on ``inputs`` (empty list: it can).
    ``backend`` (or ``VLMFAST_BACKEND``) marks one as forced, which matters for the Triton interpreter."""
    definition = get_op(op)
    forced = forced_backend(backend)
    return {name: _reasons(definition, name, inputs, name == forced) for name in list_backends()}


def _format(reasons: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}: " + ("can run" if not r else "; ".join(r)) for name, r in reasons.items())


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced by the argument, else by VLMFAST_BACKEND, else None. Validates the name."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
    name = backend if backend is not None else (os.environ.get("VLMFAST_BACKEND") or None)
    if name is None:
        return None
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in _BACKENDS:
        source = "backend" if backend is not None else "VLMFAST_BACKEND"
        raise ValueError(f"{source}: expected one of {list_backends()} or 'auto', got {name!r}")
    return name


def select(op: str, backend: str | None = None, **inputs: Any) -> OpImpl:
    """The implementation of ``op`` to run on ``inputs``: the forced backend, else the first that can run it.
    Backends are checked in order and only until one can run; the full explanation is built for errors only."""
    definition = get_op(op)
    forced = forced_backend(backend)
    if forced is not None:
        if _reasons(definition, forced, inputs, True):
            raise BackendError(f"{op}: the forced backend {forced!r} cannot run these inputs. Every backend:\n"
                               + _format(explain(op, forced, **inputs)))
        return definition.impls[forced]
    for name in list_backends():
        if not _reasons(definition, name, inputs, False):
            return definition.impls[name]
    raise BackendError(f"{op}: no backend can run these inputs:\n{_format(explain(op, **inputs))}")


def choose(op: str, backend: str | None = None, **inputs: Any) -> str:
    """The name of the backend :func:`select` would run (raises the same errors)."""
    return select(op, backend, **inputs).backend


def select_step(op: str, backend: str | None = None, **inputs: Any) -> tuple[OpImpl, str | None]:
    """For a secondary step of a computation: the forced backend when it implements ``op`` and can run
    ``inputs``, else the default choice together with a note saying why the forced one was not used (the caller
    reports the note in its result). Without a forced backend the note is None."""
    forced = forced_backend(backend)
    if forced is None:
        return select(op, "auto", **inputs), None
    definition = get_op(op)
    reasons = _reasons(definition, forced, inputs, True)
    if not reasons:
        return definition.impls[forced], None
    impl = select(op, "auto", **inputs)  # "auto": the default order, whatever VLMFAST_BACKEND says
    return impl, f"forced backend {forced!r} not used for {op} ({'; '.join(reasons)}); ran {impl.backend!r}"
