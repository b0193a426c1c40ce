"""``python -m vlmfast.info`` (or ``vlmfast info``): what this installation can run, and why not the rest.

Prints the version, the versions of the libraries vlmfast uses, the GPU, the compiled module's build facts, every
backend with its availability and reasons, and for each op which backend a CPU and a CUDA call would get.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from typing import Any

import torch

from vlmfast import _dispatch
from vlmfast._C_loader import C_error, cuda_runtime, get_C
from vlmfast._version import __version__

_LIBS = ("torch", "triton", "numpy", "open_clip", "faiss", "torchmetrics", "matplotlib", "safetensors", "ray")


def _version_of(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "installed"))


def _probe_inputs(device: str) -> dict[str, dict[str, Any]]:
    """Small inputs per op, to show which backend a call on ``device`` would get."""
    return {"calibration_bins": {"logits": torch.empty(1, 1, 2, device=device), "n_bins": 15}}


def info_dict() -> dict[str, Any]:
    C = get_C()
    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
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
        "backends": {},
        "ops": {},
    }
    for name in _dispatch.BACKENDS:
        reasons = _dispatch.backend_reasons(name)
        d["backends"][name] = {
            "description": _dispatch.BACKEND_DESCRIPTIONS[name],
            "available": not reasons,
            "reasons": reasons,
        }
    # import the ops so that they register
    import vlmfast.ops.calibration_bins  # noqa: F401

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in _dispatch.list_ops():
        d["ops"][op] = {}
        for dev in devices:
            inputs = _probe_inputs(dev).get(op, {})
            reasons = _dispatch.explain(op, **inputs)
            chosen = next((b for b in _dispatch.BACKENDS if not reasons[b]), None)
            d["ops"][op][dev] = {"default": chosen, "reasons": reasons}
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
    lines.append("backends (default order):")
    for name, b in d["backends"].items():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        lines.append(f"  {name:<7} {state}")
        lines.append(f"          {b['description']}")
    lines.append("")
    lines.append("ops (backend a call would get, and why not the others):")
    for op, per_dev in d["ops"].items():
        for dev, r in per_dev.items():
            lines.append(f"  {op} on {dev} tensors -> {r['default']}")
            for name, reasons in r["reasons"].items():
                if reasons:
                    lines.append(f"      {name}: {'; '.join(reasons)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = info_dict()
    if "--json" in argv:
        print(json.dumps(d, indent=2, default=str))
    else:
        print(format_info(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
