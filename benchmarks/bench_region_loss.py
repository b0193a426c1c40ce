"""Benchmark: RaVL's region-aware loss ``region_loss`` (L_R + L_A), forward + backward into the region embeddings
and the class text embeddings, against the torch reference ``region_loss_ref`` (the per-image loop formula with
autograd; the speed-up baseline).

No peer library exists: RaVL's stage-2 loss has no released implementation (the spec is a port of the paper), so
the ``speedup_vs_peer`` column is against the reference too (the table says so in the notes).

Every backend the dispatcher offers for the inputs is timed (on CPU: ``cpp`` and ``torch``; the Triton interpreter
is a test vehicle, not timed). Inputs: ``B`` images with ``R`` padded regions each (about 40 % relevant, 30 %
spurious, the rest padding), ``C`` classes, embedding width ``D``; tau = 0.07, normalize=True, mean reduction.

    python benchmarks/bench_region_loss.py                  # the CPU configs (and the GPU ones when present)
    python benchmarks/bench_region_loss.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(B=32, R=4, D=32, C=5, device="cpu", dtype="float32"),
    "cpu-256x4x512x10": dict(B=256, R=4, D=512, C=10, device="cpu", dtype="float32"),
    "cpu-256x16x512x100": dict(B=256, R=16, D=512, C=100, device="cpu", dtype="float32"),
    "gpu-256x4x512x10-bf16": dict(B=256, R=4, D=512, C=10, device="cuda", dtype="bfloat16"),
    "gpu-1024x16x768x1000-bf16": dict(B=1024, R=16, D=768, C=1000, device="cuda", dtype="bfloat16"),
}
REF = "region_loss_ref (no peer exists)"


def _data(cfg):
    B, R, D, C, device = cfg["B"], cfg["R"], cfg["D"], cfg["C"], cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, R, D, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(C, D, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    u = torch.rand(B, R, generator=g).to(device)
    rel, spu = u < 0.4, (u >= 0.4) & (u < 0.7)
    return x, t, y, rel, spu


def run_config(name: str, cfg: dict, reps: int | None, record: bool) -> list[dict]:
    from vlmfast import _dispatch
    from vlmfast.functional import region_loss, region_loss_ref

    device = cfg["device"]
    x0, t0, y, rel, spu = _data(cfg)
    x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()

    def step(fn):
        def go():
            x.grad = t.grad = None
            fn(x, t, y, rel, spu).loss.backward()
        return go

    reasons = _dispatch.explain("region_loss", regions=x, text=t)
    backends = [b for b in _dispatch.list_backends() if not reasons[b]]
    providers = {f"region_loss [{b}]": step(lambda *a, b=b: region_loss(*a, backend=b)) for b in backends}
    providers[REF] = step(region_loss_ref)
    # agreement with the reference before anything is timed
    providers[REF]()
    want = [x.grad.float().clone(), t.grad.float().clone()]
    notes = {}
    for label, fn in providers.items():
        fn()
        err = max(float((g.grad.float() - w).abs().max() / (w.abs().max() + 1e-30)) for g, w in zip((x, t), want))
        notes[label] = f"max rel grad diff vs ref {err:.1e}"
    n = reps or (5 if name == "quick" else 10)
    timings = {}
    for label, fn in providers.items():
        timings[label] = _runner.time_fn(fn, device, reps=n, warmup=2)
        notes[label] += f"; peak +{_runner.peak_mb(fn, device):.1f} MB"
    B, R, D, C = cfg["B"], cfg["R"], cfg["D"], cfg["C"]
    config = f"{name} B={B} R={R} D={D} C={C} {cfg['dtype']} {device}"
    print(f"\n### region_loss fwd+bwd: {config}  ({_runner.device_name(device)})\n")
    return _runner.report("region_loss", config, device, timings, ref=REF, peer=REF, notes=notes,
                          extra_note="peer: none exists (no released RaVL loss); speedup_vs_peer = vs the torch "
                                     "reference", record=record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick",))


if __name__ == "__main__":
    raise SystemExit(main())
