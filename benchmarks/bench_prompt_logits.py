"""Benchmark: the fused prompt-logit head ``prompt_logits`` (normalize, X W^T s, softmax CE, confidence/argmax) and
``calibration_from_features`` (M heads on one backbone, logits never materialised), against

* the unfused torch way (peer): ``F.normalize`` + matmul + ``F.cross_entropy`` + ``softmax().max()``, autograd
  for the backward (materialises the N x C logits and probabilities);
* the same function under ``torch.compile`` (peer 2; compile time excluded by the warm-up);
* for the heads: materialising the (M, N, C) logits with one batched matmul, then ``vlmfast.metrics.calibration``
  (peer), and the GEMM alone (the floor: no calibration at all).

Peak memory is the growth of the process's peak RSS (Linux ``/proc/self/status`` VmHWM after a reset) on CPU and
``torch.cuda.max_memory_allocated`` on CUDA, noted per provider.

    python benchmarks/bench_prompt_logits.py                  # the CPU configs (and the GPU ones when present)
    python benchmarks/bench_prompt_logits.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(kind="head", N=8, C=50, D=32, device="cpu", dtype="float32", compile=False),
    "quick-heads": dict(kind="heads", M=4, N=300, C=10, D=32, device="cpu", dtype="float32", peer_heads=None),
    "cpu-train-32x1000x512": dict(kind="head", N=32, C=1000, D=512, device="cpu", dtype="float32", compile=True),
    "cpu-eval-50kx1000x512": dict(kind="head", N=50_000, C=1000, D=512, device="cpu", dtype="float32",
                                  compile=True, forward_only=True),
    "cpu-heads-1000x10kx100": dict(kind="heads", M=1000, N=10_000, C=100, D=512, device="cpu", dtype="float32",
                                   peer_heads=None),
    "gpu-train-32x1000x512": dict(kind="head", N=32, C=1000, D=512, device="cuda", dtype="bfloat16", compile=True),
    "gpu-eval-50kx1000x512": dict(kind="head", N=50_000, C=1000, D=512, device="cuda", dtype="bfloat16",
                                  compile=True, forward_only=True),
    "gpu-heads-1000x50kx1000": dict(kind="heads", M=1000, N=50_000, C=1000, D=512, device="cuda", dtype="bfloat16",
                                    peer_heads=20),
}


def unfused(x, w, s, y):
    z = s * F.normalize(x.float(), dim=-1) @ F.normalize(w.float(), dim=-1).t()
    loss = F.cross_entropy(z, y)
    conf, pred = torch.softmax(z, dim=-1).max(dim=-1)
    return loss, conf, pred


def _head(name, cfg, reps, record):
    from vlmfast import _dispatch
    from vlmfast.functional import prompt_logits

    N, C, D, device = cfg["N"], cfg["C"], cfg["D"], cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, D, generator=g, device=device).to(dtype)
    w = torch.randn(C, D, generator=g, device=device).to(dtype).requires_grad_()
    s = torch.tensor(100.0, device=device, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g, device=device)
    reasons = _dispatch.explain("prompt_logits", x=x, w=w)
    backends = [b for b in _dispatch.list_backends() if not reasons[b]]
    compiled = torch.compile(unfused) if cfg.get("compile") else None
    modes = ["forward"] if cfg.get("forward_only") else ["forward", "forward+backward"]
    rows = []
    for mode in modes:
        def run(f):
            if mode == "forward":
                with torch.no_grad():
                    return f()
            out = f()
            loss = out[0] if isinstance(out, tuple) else out.loss
            return torch.autograd.grad(loss, (w, s))

        providers = {f"prompt_logits [{b}]": (lambda b=b: prompt_logits(x, w, s, y, backend=b)) for b in backends}
        providers["unfused torch"] = lambda: unfused(x, w, s, y)
        if compiled is not None:
            providers["torch.compile(unfused)"] = lambda: compiled(x, w, s, y)
        timings, notes = {}, {}
        for label, f in providers.items():
            timings[label] = _runner.time_fn(lambda f=f: run(f), device, reps=reps)
            notes[label] = f"peak +{_runner.peak_mb(lambda f=f: run(f), device):.1f} MB"
        config = f"{mode} N={N} C={C} D={D} {cfg['dtype']} {device}"
        print(f"\n## prompt_logits: {config}  ({_runner.device_name(device)})\n")
        rows += _runner.report("prompt_logits", config, device, timings, ref="prompt_logits [torch]",
                               peer="unfused torch", peer2="torch.compile(unfused)" if compiled else None,
                               notes=notes, record=record)
    return rows


def _heads(name, cfg, reps, record):
    from vlmfast.metrics import calibration, calibration_from_features

    M, N, C, D, device = cfg["M"], cfg["N"], cfg["C"], cfg["D"], cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, D, generator=g, device=device).to(dtype)
    w = torch.randn(M, C, D, generator=g, device=device).to(dtype)
    s = torch.full((M,), 50.0, device=device)
    y = torch.randint(0, C, (N,), generator=g, device=device)
    peer_heads = cfg.get("peer_heads") or M

    def materialise(m):
        xn = F.normalize(x.float(), dim=-1).unsqueeze(0).expand(m, -1, -1)
        return s[:m].view(-1, 1, 1) * torch.bmm(xn, F.normalize(w[:m].float(), dim=-1).transpose(1, 2))

    providers = {
        "calibration_from_features": lambda: calibration_from_features(x, w, s, y, 15),
        "materialise + calibration": lambda: calibration(materialise(peer_heads), y, 15),
        "GEMM only (floor)": lambda: materialise(peer_heads),
    }
    timings, notes = {}, {}
    reps = reps or 3
    for label, f in providers.items():
        t = _runner.time_fn(f, device, reps=reps, warmup=1, max_seconds=120)
        mb = _runner.peak_mb(f, device)
        if label != "calibration_from_features" and peer_heads != M:
            t = _runner.scaled(t, M / peer_heads)
            notes[label] = f"extrapolated from {peer_heads} heads; peak +{mb:.0f} MB at {peer_heads} heads"
        else:
            notes[label] = f"peak +{mb:.0f} MB"
        timings[label] = t
    logits_mb = M * N * C * 4 / 2**20
    config = f"heads M={M} N={N} C={C} D={D} {cfg['dtype']} {device}"
    print(f"\n## calibration_from_features: {config}  ({_runner.device_name(device)}; float32 logits would be "
          f"{logits_mb:.0f} MB)\n")
    return _runner.report("calibration_from_features", config, device, timings, ref=None,
                          peer="materialise + calibration", peer2="GEMM only (floor)", notes=notes,
                          extra_note=f"float32 logits {logits_mb:.0f} MB", record=record)


def run_config(name: str, cfg: dict, reps: int, record: bool) -> list[dict]:
    rows = (_head if cfg["kind"] == "head" else _heads)(name, cfg, reps, record)
    if name == "quick":  # the test suite's one config covers both kinds
        rows += _heads("quick-heads", CONFIGS["quick-heads"], reps, record)
    return rows


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick", "quick-heads"), default_reps=10)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
