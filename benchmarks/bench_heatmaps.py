"""Benchmark: batched explanation heatmaps (``vlmfast.audit.heatmaps``: Chefer relevance, last block and all blocks)
against the reference's way — one image per backward pass, and for all blocks one ``autograd.grad`` call per block
(each re-traversing the graph to that block), then the N x N relevance products — on the same model and images.

Providers: ``vlmfast-last``, ``vlmfast-all`` (batched, one backward per batch); ``naive-last``, ``naive-all`` (per
image; the all-block rollout ``R <- R + Abar R`` on full matrices). The table's ``median_ms`` is for the whole image
set; images/s is in the notes. ``speedup_vs_ref`` is against ``naive-last``, ``speedup_vs_peer`` against
``naive-all``. Random-init models (the cost does not depend on the weights).

    python benchmarks/bench_heatmaps.py                  # the CPU configs (and the GPU one when present)
    python benchmarks/bench_heatmaps.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(model="vlmfast-tiny-vit", n=4, size=56, device="cpu", batch=4),
    "cpu-tiny-vit-128": dict(model="vlmfast-tiny-vit", n=128, size=56, device="cpu", batch=64),
    "cpu-vitb16-8": dict(model="ViT-B-16", n=8, size=224, device="cpu", batch=8),
    "gpu-vitb16-512": dict(model="ViT-B-16", n=512, size=224, device="cuda", batch=128),
}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def naive(model, images, labels, text, blocks: str):
    """The reference's loop: one image at a time; all blocks: one autograd.grad per block."""
    from vlmfast.models.factory import preprocess_for

    visual = model.visual
    scale = model.logit_scale.detach().exp()
    resblocks = list(visual.transformer.resblocks)
    out = []
    for i in range(images.shape[0]):
        saved = []

        def make(blk):
            mha = blk.attn

            def attention(q_x, k_x=None, v_x=None, attn_mask=None):
                b, n, e = q_x.shape
                h = mha.num_heads
                q, k, v = (t.reshape(b, n, h, e // h).transpose(1, 2)
                           for t in F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias).split(e, -1))
                a = torch.softmax(q @ k.transpose(-1, -2) * (e // h) ** -0.5, dim=-1)
                saved.append(a)
                return mha.out_proj((a @ v).transpose(1, 2).reshape(b, n, e))
            return attention

        for blk in resblocks:
            blk.attention = make(blk)
        try:
            x = preprocess_for(model, images[i:i + 1]).requires_grad_(True)
            s = scale * (F.normalize(visual(x), dim=-1) @ text[labels[i]]).sum()
            use = saved[-1:] if blocks == "last" else saved
            grads = [torch.autograd.grad(s, [a], retain_graph=True)[0] for a in use]  # one call per block
        finally:
            for blk in resblocks:
                blk.__dict__.pop("attention", None)
        n = saved[0].shape[-1]
        rel = torch.eye(n, device=x.device)
        for a, g in zip(use, grads):
            rel = rel + (g * a).clamp(min=0).mean(dim=1)[0] @ rel
        out.append(rel[0, 1:].detach())
    return torch.stack(out)


def run(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    from vlmfast.audit import heatmaps
    from vlmfast.models import create_model
    from vlmfast.models.text import zero_shot_head

    device = cfg["device"]
    torch.manual_seed(0)
    model = create_model(cfg["model"], pretrained=None, device=device).eval()
    model.requires_grad_(False)
    n = cfg["n"]
    images = torch.randint(0, 256, (n, 3, cfg["size"], cfg["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % len(NAMES)
    text = F.normalize(zero_shot_head(model, NAMES, ["a photo of a {}"]), dim=-1)
    providers = {
        "vlmfast-last": lambda: heatmaps(model, images, labels, text_features=text, blocks="last", batch_size=cfg["batch"]),
        "vlmfast-all": lambda: heatmaps(model, images, labels, text_features=text, blocks="all", batch_size=cfg["batch"]),
        "naive-last": lambda: naive(model, images, labels.to(device), text, "last"),
        "naive-all": lambda: naive(model, images, labels.to(device), text, "all"),
    }
    # the batched maps equal the naive ones before anything is timed (pre-upsampling rows compared via the grid)
    grid = model.visual.grid_size
    ours = heatmaps(model, images[:2], labels[:2], text_features=text, blocks="all", size=grid).maps
    ref = naive(model, images[:2], labels[:2].to(device), text, "all").reshape(2, *grid)
    lo = ref.reshape(2, -1).amin(1)[:, None, None]
    hi = ref.reshape(2, -1).amax(1)[:, None, None]
    err = float(((ref - lo) / (hi - lo) - ours).abs().max())
    r = reps or (3 if name == "quick" else 5)
    timings = {k: _runner.time_fn(fn, device, reps=r, warmup=1) for k, fn in providers.items()}
    notes = {k: f"{n / (t.median / 1e3):.1f} images/s" for k, t in timings.items()}
    print(f"\n### heatmaps: {name} ({cfg['model']}, {n} images, batch {cfg['batch']})\n")
    _runner.report("heatmaps", name, device, timings, ref="naive-last", peer="naive-all", notes=notes,
                   extra_note=f"{cfg['model']} random init, {n} images of {cfg['size']}px, batch {cfg['batch']}; "
                              f"max |batched - naive| (all blocks, grid) {err:.1e}", record=record)


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run)


if __name__ == "__main__":
    raise SystemExit(main())
