"""Benchmark: the op ``equal_mass_bins`` (ACE's equal-mass bins of M models x N confidences: a stable sort per
model, then group sums), on every backend that can run it, against

* the torch reference (``backend="torch"``: ``torch.sort(stable=True)`` + ``scatter_add``),
* **the DAC/DOR reference way** (peer): per model, scikit-learn ``KBinsDiscretizer(strategy="quantile")`` bin
  edges + ``numpy`` group sums, as ``ml-stat-Sustech/CLIP_Calibration`` computes ACE (its bins differ slightly
  at ties, the cost is the comparable part),
* numpy's stable ``argsort`` per model + ``np.add.reduceat`` (peer 2: the fastest plain numpy way).

    python benchmarks/bench_equal_mass_bins.py                 # the CPU configs (and the GPU one when present)
    python benchmarks/bench_equal_mass_bins.py --config quick  # seconds; what the test suite runs
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(M=3, N=5000, n_bins=15, device="cpu", peer_models=None),
    "cpu-50x10k": dict(M=50, N=10_000, n_bins=15, device="cpu", peer_models=None),
    "cpu-8x1m": dict(M=8, N=1_000_000, n_bins=15, device="cpu", peer_models=2),
    "gpu-500x50k": dict(M=500, N=50_000, n_bins=15, device="cuda", peer_models=10),
}


def make_inputs(M, N, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    conf = torch.rand(M, N, generator=g, device=device) * 0.9 + 0.1
    conf[:, ::7] = 0.5  # ties, as saturated or quantised confidences give
    correct = torch.rand(M, N, generator=g, device=device) < conf
    return conf, correct


def dac_way(conf: np.ndarray, correct: np.ndarray, n_bins: int, models) -> list:
    from sklearn.preprocessing import KBinsDiscretizer

    out = []
    for m in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = KBinsDiscretizer(n_bins=n_bins, encode="ordinal", strategy="quantile")
            b = est.fit_transform(conf[m].reshape(-1, 1)).ravel().astype(np.int64)
        k = int(b.max()) + 1
        out.append((np.bincount(b, minlength=k), np.bincount(b, correct[m], minlength=k),
                    np.bincount(b, conf[m], minlength=k)))
    return out


def numpy_way(conf: np.ndarray, correct: np.ndarray, n_bins: int, models) -> list:
    out = []
    N = conf.shape[1]
    q, r = divmod(N, n_bins)
    starts = np.concatenate([[0], np.cumsum([q + (1 if b < r else 0) for b in range(n_bins)])[:-1]])
    for m in models:
        order = np.argsort(conf[m], kind="stable")
        out.append((np.add.reduceat(correct[m][order].astype(np.int64), starts),
                    np.add.reduceat(conf[m][order].astype(np.float64), starts)))
    return out


def run_config(name: str, cfg: dict, reps: int, record: bool) -> list[dict]:
    from vlmfast import _dispatch
    from vlmfast.ops.equal_mass_bins import equal_mass_bins

    M, N, n_bins, device = cfg["M"], cfg["N"], cfg["n_bins"], cfg["device"]
    conf, correct = make_inputs(M, N, device)
    config = f"M={M} N={N} n_bins={n_bins} float32 {device}"
    print(f"\n## equal_mass_bins: {config}  ({_runner.device_name(device)})\n")
    reasons = _dispatch.explain("equal_mass_bins", confidence=conf, n_bins=n_bins)
    backends = [b for b in _dispatch.list_backends() if not reasons[b]]
    timings: dict[str, _runner.Timing] = {}
    notes: dict[str, str] = {}
    for b in backends:
        timings[f"equal_mass_bins [{b}]"] = _runner.time_fn(
            lambda b=b: equal_mass_bins(conf, correct, n_bins, backend=b), device, reps=reps)
    conf_np, correct_np = conf.cpu().numpy(), correct.cpu().numpy()
    peer_models = cfg["peer_models"] or M
    for label, fn in (("DAC reference way (sklearn quantile bins)", dac_way), ("numpy stable argsort", numpy_way)):
        t = _runner.time_fn(lambda fn=fn: fn(conf_np, correct_np, n_bins, range(peer_models)), "cpu",
                            reps=max(3, (reps or 10) // 3), warmup=1)
        if peer_models != M:
            t = _runner.scaled(t, M / peer_models)
            notes[label] = f"extrapolated from {peer_models} models"
        timings[label] = t
    return _runner.report("equal_mass_bins", config, device, timings, ref="equal_mass_bins [torch]",
                          peer="DAC reference way (sklearn quantile bins)", peer2="numpy stable argsort",
                          notes=notes, record=record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick",), default_reps=10)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
