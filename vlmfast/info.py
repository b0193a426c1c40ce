"""What this installation can run, and why not the rest: ``python -m vlmfast.info`` (or ``vlmfast info``).

:func:`info_dict` collects the version, the versions of the libraries vlmfast uses, the GPU, the compiled
module's build facts, the forced backend (``VLMFAST_BACKEND`` or ``backend=``), every backend with its
availability and reasons, and for each op the backend a CPU (and, where visible, a CUDA) call would get — the
forced one when it can run them, else the error that call would raise. :func:`format_info` renders it as text.
Both are library functions; the command line lives in :mod:`vlmfast.cli` (this module never imports it).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from vlmfast import _dispatch
from vlmfast._C_loader import C_error, cuda_runtime, get_C
from vlmfast._dispatch import BackendError
from vlmfast._optional import EXTRAS
from vlmfast._version import __version__

#: import name -> the distributions that provide it (the first installed one is reported)
_LIBS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "triton": ("triton",),
    "numpy": ("numpy",),
    "open_clip": ("open_clip_torch",),
    "safetensors": ("safetensors",),
    "matplotlib": ("matplotlib",),
    "sklearn": ("scikit-learn",),
    "mlxtend": ("mlxtend",),
    "timm": ("timm",),
    "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"),
    "ray": ("ray",),
    "torchmetrics": ("torchmetrics",),
}


def _version_of(name: str) -> str:
    """The installed version, read from the package metadata (nothing is imported: ray alone takes seconds)."""
    for dist in _LIBS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    extra = EXTRAS.get(name)
    return "not installed" + (f" (extra [{extra[1]}])" if extra else "")


def _forced(backend: str | None) -> dict[str, Any]:
    """The forced backend: ``name`` (None: the fastest that can run), ``source`` and, for an invalid name, ``error``."""
    source = "backend" if backend is not None else ("VLMFAST_BACKEND" if os.environ.get("VLMFAST_BACKEND") else None)
    value = backend if backend is not None else os.environ.get("VLMFAST_BACKEND")
    try:
        name = _dispatch.forced_backend(backend)
    except (ValueError, TypeError) as exc:
        return {"name": None, "value": value, "source": source, "error": str(exc)}
    return {"name": name, "value": value, "source": source if name is not None else None, "error": None}


def info_dict(backend: str | None = None) -> dict[str, Any]:
    """Everything :func:`format_info` prints, as plain values. ``backend`` forces a backend as a call's
    ``backend=`` would (default: ``VLMFAST_BACKEND``); an invalid one is reported in ``forced_backend.error``."""
    C = get_C()
    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    forced = _forced(backend)
    d: dict[str, Any] = {
        "vlmfast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": {name: _version_of(name) for name in _LIBS},
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "env": {k: os.environ.get(k) for k in ("VLMFAST_BACKEND", "TRITON_INTERPRET", "HF_HUB_OFFLINE")},
        "compiled_module": {
            "loaded": C is not None,
            "path": getattr(C, "__file__", None),
            "error": C_error(),
            "build_info": C.build_info() if C is not None else None,
            "cuda_runtime": dict(zip(("device_count", "error"), cuda_runtime())),
        },
        "forced_backend": forced,
        "backends": {},
        "ops": {},
    }
    for name in _dispatch.list_backends():
        b = _dispatch.get_backend(name)
        reasons = _dispatch.backend_reasons(name)
        d["backends"][name] = {
            "description": b.description,
            "devices": list(b.devices),
            "available": not reasons,
            "reasons": reasons,
        }
    _dispatch.load_ops()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in _dispatch.list_ops():
        d["ops"][op] = {}
        for dev in devices:
            inputs = _dispatch.probe_inputs(op, dev)
            name, step = forced["name"], None
            if forced["error"] is not None:
                chosen, error = None, forced["error"]
                reasons = _dispatch.explain(op, "auto", **inputs)
            else:
                reasons = _dispatch.explain(op, name or "auto", **inputs)
                try:
                    chosen, error = _dispatch.choose(op, name or "auto", **inputs), None
                except BackendError as exc:
                    chosen = None
                    own = reasons.get(name) if name is not None else None
                    error = (f"the forced backend {name!r} cannot run these inputs: {'; '.join(own)}" if own
                             else str(exc).splitlines()[0])
                    if name is not None and name not in _dispatch.implementations(op):
                        # an op the forced backend lacks: as a step inside another op the default runs, with a note
                        try:
                            step = _dispatch.choose(op, "auto", **inputs)
                        except BackendError:
                            step = None
            d["ops"][op][dev] = {"backend": chosen, "forced": name, "error": error, "as_step": step,
                                 "reasons": reasons}
    return d


def format_info(d: dict[str, Any]) -> str:
    lines = [f"vlmfast {d['vlmfast']}  (python {d['python']}, {d['platform']})", ""]
    lines.append("libraries:")
    for k, v in d["libraries"].items():
        lines.append(f"  {k:<13} {v}")
    lines.append(f"  torch CUDA build: {d['torch_cuda'] or 'none (CPU build)'}")
    lines.append("gpu: " + (", ".join(d["gpu"]) if d["gpu"] else "none visible to torch"))
    env = ", ".join(f"{k}={v}" for k, v in d["env"].items() if v is not None) or "none set"
    lines.append(f"environment: {env}")
    cm = d["compiled_module"]
    lines.append("")
    if cm["loaded"]:
        bi = cm["build_info"]
        lines.append(f"compiled module vlmfast._C: {cm['path']}")
        lines.append(
            f"  {bi['build_type']} build, {bi['compiler']}, OpenMP {bi['openmp_version']} ({bi['openmp']} threads), "
            + (f"CUDA {bi['cuda_version']} for sm {bi['cuda_archs']}" if bi["cuda"] else "no CUDA")
        )
        rt = cm["cuda_runtime"]
        if bi["cuda"]:
            lines.append(f"  CUDA runtime: {rt['device_count']} device(s)" + (f" ({rt['error']})" if rt["error"] else ""))
    else:
        lines.append(f"compiled module vlmfast._C: NOT LOADED — {cm['error']}")
    lines.append("")
    fb = d["forced_backend"]
    if fb["error"] is not None:
        lines.append(f"forced backend: INVALID {fb['source']}={fb['value']!r} — every call fails: {fb['error']}")
    elif fb["name"] is not None:
        lines.append(f"forced backend: {fb['name']} (from {fb['source']}); calls run on it or fail, never fall back")
    else:
        lines.append("forced backend: none (each call gets the first backend that can run it)")
    lines.append("backends (default order):")
    for name, b in d["backends"].items():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        lines.append(f"  {name:<7} {state}")
        lines.append(f"          {b['description']}")
    lines.append("")
    lines.append("ops (backend a call would get, and why not the others):")
    for op, per_dev in d["ops"].items():
        for dev, r in per_dev.items():
            if r["backend"] is None:
                target = f"CANNOT RUN: {r['error']}"
                if r.get("as_step"):
                    target += f" (as a step inside another op it runs on {r['as_step']}, with a note in the result)"
            elif r["forced"] is not None:
                target = f"{r['backend']} (forced)"
            else:
                target = r["backend"]
            lines.append(f"  {op} on {dev} tensors -> {target}")
            for name, reasons in r["reasons"].items():
                if reasons:
                    lines.append(f"      {name}: {'; '.join(reasons)}")
    return "\n".join(lines)


__all__ = ["format_info", "info_dict"]


if __name__ == "__main__":  # python -m vlmfast.info [--json] [--backend B]: the same as `vlmfast info`
    from vlmfast.cli import main

    raise SystemExit(main(["info", *sys.argv[1:]]))
