"""Benchmark: the fused symmetric CLIP contrastive loss ``contrastive_loss`` (``vlmfast.nn.ClipLoss``; row and column
LSE from one pass, the B x B logits never stored on the Triton path), forward + backward into both feature sets and
the logit scale, against

* open_clip's ``ClipLoss`` (peer): two ``B x B`` logit matrices, two ``F.cross_entropy``, autograd;
* the same computation under ``torch.compile`` (peer 2; compile time excluded by the warm-up);
* Inf-CL (``inf_cl.cal_inf_loss``, CUDA only) when it is installed: one call per direction, as its CLIP loss does.

Inputs are L2-normalised features (what open_clip's models hand the loss) at the issue's shapes; the fused loss runs
with ``normalize=False`` (open_clip's contract). With ``--teacher`` the CaRot self-distillation term is added
(ours: one op call; peer: open_clip's ``DistillClipLoss`` with the directions summed). Peak memory per provider in
the notes (CUDA: ``max_memory_allocated``; CPU: peak RSS growth).

    python benchmarks/bench_contrastive_loss.py                  # the CPU configs (and the GPU ones when present)
    python benchmarks/bench_contrastive_loss.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(B=64, D=32, device="cpu", dtype="float32", compile=False, teacher=False),
    "quick-teacher": dict(B=64, D=32, device="cpu", dtype="float32", compile=False, teacher=True),
    "cpu-1024x512": dict(B=1024, D=512, device="cpu", dtype="float32", compile=True, teacher=False),
    "cpu-1024x512-teacher": dict(B=1024, D=512, device="cpu", dtype="float32", compile=False, teacher=True),
    "gpu-1024x512-bf16": dict(B=1024, D=512, device="cuda", dtype="bfloat16", compile=True, teacher=False),
    "gpu-8192x512-bf16": dict(B=8192, D=512, device="cuda", dtype="bfloat16", compile=True, teacher=False),
    "gpu-32768x768-bf16": dict(B=32768, D=768, device="cuda", dtype="bfloat16", compile=False, teacher=False),
    "gpu-8192x512-bf16-teacher": dict(B=8192, D=512, device="cuda", dtype="bfloat16", compile=False, teacher=True),
}


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]
    except Exception:
        return None
    return cal_inf_loss


def run(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    from open_clip.loss import ClipLoss as OpenClipLoss
    from open_clip.loss import DistillClipLoss as OpenDistill

    from vlmfast import _dispatch
    from vlmfast.nn import ClipLoss, DistillClipLoss

    B, D, device = cfg["B"], cfg["D"], cfg["device"]
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(0)
    f0 = F.normalize(torch.randn(B, D, generator=gen), dim=-1).to(device=device, dtype=dtype)
    g0 = F.normalize(f0.float() + 0.5 * torch.randn(B, D, generator=gen).to(device), dim=-1).to(dtype)
    teacher = cfg["teacher"]
    if teacher:
        tf = F.normalize(f0.float() + 0.3 * torch.randn(B, D, generator=gen).to(device), dim=-1).to(dtype)
        tg = F.normalize(g0.float() + 0.3 * torch.randn(B, D, generator=gen).to(device), dim=-1).to(dtype)
    f = f0.clone().requires_grad_()
    g = g0.clone().requires_grad_()
    ls = torch.tensor(math.log(100.0), device=device, requires_grad=True)
    backend = _dispatch.choose("contrastive_loss", None, f=f, g=g)

    ours_mod = DistillClipLoss() if teacher else ClipLoss()
    peer_mod = OpenDistill() if teacher else OpenClipLoss()

    def step(fn):
        def go():
            f.grad = g.grad = ls.grad = None
            out = fn()
            loss = out[0] + out[1] if isinstance(out, tuple) else out
            loss.backward()
        return go

    ts = torch.tensor(90.0, device=device)
    if teacher:
        ours = step(lambda: ours_mod(f, g, ls.exp(), tf, tg, ts))

        def peer_fn():
            c, d = peer_mod(f, g, ls.exp(), tf, tg, ts)
            return c, 2 * d  # CaRot sums the two directions; open_clip averages them
        peer = step(peer_fn)
    else:
        ours = step(lambda: ours_mod(f, g, ls.exp()))
        peer = step(lambda: peer_mod(f, g, ls.exp()))
    # the two agree before anything is timed
    ours()
    want = [t.grad.clone() for t in (f, g, ls)]
    peer()
    got = [t.grad.clone() for t in (f, g, ls)]
    err = max(float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-30)) for a, b in zip(want, got))

    n = reps or (5 if name.startswith("quick") else 10)
    providers = {f"vlmfast-{backend}": ours, "open_clip": peer}
    if cfg.get("compile"):
        if teacher:
            compiled = torch.compile(lambda: peer_mod(f, g, ls.exp(), tf, tg, ts))
        else:
            compiled = torch.compile(lambda: peer_mod(f, g, ls.exp()))
        providers["open_clip+compile"] = step(compiled)
    cal_inf_loss = _inf_cl() if device == "cuda" and not teacher else None
    if cal_inf_loss is not None:
        def inf_cl():  # its CLIP loss: one call per direction
            s = ls.exp()
            return 0.5 * (cal_inf_loss(f, g, scale=s).mean() + cal_inf_loss(g, f, scale=s).mean())
        providers["inf-cl"] = step(inf_cl)
    timings, notes = {}, {}
    for label, fn in providers.items():
        timings[label] = _runner.time_fn(fn, device, reps=n, warmup=2)
        notes[label] = f"peak +{_runner.peak_mb(fn, device):.1f} MB"
    logits_mb = 2 * B * B * 4 / 2**20
    print(f"\n### contrastive loss fwd+bwd: {name} (B={B}, D={D}, {cfg['dtype']}, teacher={teacher}, ours={backend})\n")
    _runner.report("contrastive_loss", name, device, timings, ref="open_clip", peer="open_clip",
                   peer2="open_clip+compile" if "open_clip+compile" in timings else None, notes=notes,
                   extra_note=f"B={B} D={D} {cfg['dtype']} teacher={teacher}; two fp32 BxB logit matrices = "
                              f"{logits_mb:.0f} MB; max rel grad diff vs open_clip {err:.1e}", record=record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run, skip_by_default=("quick", "quick-teacher"))


if __name__ == "__main__":
    raise SystemExit(main())
