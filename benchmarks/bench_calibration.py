"""Benchmark: the whole calibration audit (ECE, ACE, MCE both forms, RMSCE, NLL, Brier, accuracy, confidence) of
M models x N samples x C classes, on every backend that can run it, against

* the torch reference (``backend="torch"``: the same formulas in plain torch, chunked),
* **the torchmetrics way** of getting the same numbers: per model, softmax once, then
  ``multiclass_calibration_error`` with ``norm="l1"``, ``"l2"`` and ``"max"`` (ECE, RMSCE, MCE), plus torch NLL
  (``F.cross_entropy``) and Brier (``((p - onehot)^2).sum(-1).mean()``),
* a single torchmetrics ECE loop (one ``norm="l1"`` call per model),

and reports the fraction of the floor achieved: floor = max(bytes of logits / measured read bandwidth,
M*N*C / measured exp throughput), both measured in the same run.

    python benchmarks/bench_calibration.py                 # the CPU configs (and the GPU one when a GPU is present)
    python benchmarks/bench_calibration.py --config quick  # seconds; what the test suite runs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(M=3, N=2000, C=20, dtype=torch.float32, device="cpu", peer_models=None),
    "cpu-50x10k-c100": dict(M=50, N=10_000, C=100, dtype=torch.float32, device="cpu", peer_models=None),
    "cpu-8x50k-c1000": dict(M=8, N=50_000, C=1000, dtype=torch.float32, device="cpu", peer_models=None),
    "gpu-500x50k-c1000-bf16": dict(M=500, N=50_000, C=1000, dtype=torch.bfloat16, device="cuda", peer_models=20),
}
N_BINS = 15


def make_inputs(M, N, C, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(M, N, C, dtype=dtype, device=device)
    for m in range(M):  # model by model: no float32 temporary of the whole tensor
        logits[m] = (torch.randn(N, C, generator=g, device=device) * 3).to(dtype)
    labels = torch.randint(0, C, (N,), generator=g, device=device)
    return logits, labels


def torchmetrics_way(logits, labels, models, norms=("l1", "l2", "max"), nll_brier=True):
    from torchmetrics.functional.classification import multiclass_calibration_error

    C = logits.shape[-1]
    out = []
    for m in models:
        x = logits[m].float()
        p = x.softmax(-1)
        for norm in norms:
            out.append(multiclass_calibration_error(p, labels, C, n_bins=N_BINS, norm=norm))
        if nll_brier:
            out.append(torch.nn.functional.cross_entropy(x, labels))
            out.append((p - torch.nn.functional.one_hot(labels, C)).square().sum(-1).mean())
    return out


def run_config(name: str, cfg: dict, reps: int, record: bool) -> list[dict]:
    from vlmfast import _dispatch
    from vlmfast.metrics import calibration
    from vlmfast.ops.calibration_bins import calibration_bins

    M, N, C, dtype, device = cfg["M"], cfg["N"], cfg["C"], cfg["dtype"], cfg["device"]
    logits, labels = make_inputs(M, N, C, dtype, device)
    config = f"M={M} N={N} C={C} {str(dtype).replace('torch.', '')} {device} n_bins={N_BINS}"
    print(f"\n## calibration audit: {config}  ({_runner.device_name(device)})\n")

    bw = _runner.read_bandwidth_gbs(device)
    rate = _runner.exp_rate(device)
    nbytes = logits.numel() * logits.element_size()
    floor_ms = max(nbytes / (bw * 1e9), logits.numel() / rate) * 1e3
    print(f"measured read bandwidth {bw:.1f} GB/s, exp throughput {rate / 1e9:.2f} G/s -> floor {floor_ms:.3g} ms")

    # The dispatcher's own view: the Triton interpreter is never a candidate on CPU tensors unless forced.
    reasons = _dispatch.explain("calibration_bins", logits=logits, n_bins=N_BINS)
    backends = [b for b in _dispatch.list_backends() if not reasons[b]]

    timings: dict[str, _runner.Timing] = {}
    notes: dict[str, str] = {}
    for b in backends:
        timings[f"vlmfast calibration [{b}]"] = _runner.time_fn(
            lambda b=b: calibration(logits, labels, N_BINS, backend=b), device, reps=reps
        )
        if b != "torch":
            timings[f"op only calibration_bins [{b}]"] = _runner.time_fn(
                lambda b=b: calibration_bins(logits, labels, N_BINS, backend=b), device, reps=reps
            )
            timings[f"op only, validate_args=False [{b}]"] = _runner.time_fn(
                lambda b=b: calibration_bins(logits, labels, N_BINS, backend=b, validate_args=False), device,
                reps=reps,
            )
    peer_models = cfg["peer_models"] or M
    for label, norms, nb in (("torchmetrics way (l1+l2+max, NLL, Brier)", ("l1", "l2", "max"), True),
                             ("torchmetrics single ECE loop", ("l1",), False)):
        t = _runner.time_fn(lambda: torchmetrics_way(logits, labels, range(peer_models), norms, nb), device,
                            reps=max(3, reps // 3), warmup=1)
        if peer_models != M:
            t = _runner.scaled(t, M / peer_models)
            notes[label] = f"extrapolated from {peer_models} models"
        timings[label] = t
    return _runner.report("calibration", config, device, timings, ref="vlmfast calibration [torch]",
                          peer="torchmetrics way (l1+l2+max, NLL, Brier)", peer2="torchmetrics single ECE loop",
                          floor_ms=floor_ms, notes=notes, extra_note=f"bw {bw:.0f} GB/s", record=record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick",), default_reps=10)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
