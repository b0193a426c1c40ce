"""``make demo`` / ``vlmfast demo``: a calibration audit of a small fleet, offline, in well under a minute on a CPU.

Stand-in fleet until the data and model issue lands: generated images of oriented gratings (10 classes, one
orientation each, random frequency, phase, tint and noise), encoded by three tiny open_clip image towers with
different random initialisations; each tower gets a logistic-regression head fitted on a training split, and
each head is evaluated at three temperatures (0.5: over-confident, 1: as fitted, 2: under-confident) — nine
models. All nine are audited in one :func:`vlmfast.metrics.calibration` call; the table is printed and the
reliability diagrams are written to a PNG.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def gratings(n: int, n_classes: int = 10, size: int = 32, noise: float = 0.2, seed: int = 0):
    """``n`` RGB images (n, 3, size, size) in [0, 1]-ish and labels: class c = a grating at angle c * pi / n_classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    theta = labels.float() * math.pi / n_classes + 0.08 * torch.randn(n, generator=g)
    freq = 2.0 + 2.0 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    proj = xs[None] * torch.cos(theta)[:, None, None] + ys[None] * torch.sin(theta)[:, None, None]
    wave = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    tint = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    img = 0.5 + 0.5 * wave[:, None] * tint + noise * torch.randn(n, 3, size, size, generator=g)
    return img, labels


def _tower(seed: int):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_VIT)
    return model.eval()


@torch.no_grad()
def _features(model, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = [model.encode_image(images[i : i + batch], normalize=True) for i in range(0, len(images), batch)]
    return torch.cat(out)


def _fit_head(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 200) -> torch.nn.Linear:
    head = torch.nn.Linear(feats.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    x = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    head.mu, head.sd = feats.mean(0), feats.std(0) + 1e-6

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), labels) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def stand_in_fleet(n_train: int = 3000, n_test: int = 5000, towers: int = 3, temperatures=(0.5, 1.0, 2.0), seed=0):
    """Logits ``(towers * len(temperatures), n_test, 10)``, labels ``(n_test,)`` and model names."""
    xtr, ytr = gratings(n_train, seed=seed)
    xte, yte = gratings(n_test, seed=seed + 1)
    logits, names = [], []
    for t in range(towers):
        model = _tower(seed + 100 + t)
        ftr, fte = _features(model, xtr), _features(model, xte)
        head = _fit_head(ftr, ytr, 10)
        with torch.no_grad():
            z = head((fte - head.mu) / head.sd)
        for temp in temperatures:
            logits.append(z / temp)
            names.append(f"tower{t} T={temp:g}")
    return torch.stack(logits), yte, names


def main(argv: list[str] | None = None) -> int:
    from vlmfast.metrics import calibration
    from vlmfast.plot import reliability_diagram

    ap = argparse.ArgumentParser(prog="vlmfast demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="output folder (default: out)")
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--backend", default=None, help="force a backend (triton, cuda, cpp, torch)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    logits, labels, names = stand_in_fleet(n_test=args.n_test)
    t1 = time.perf_counter()
    result = calibration(logits, labels, n_bins=15, per_batch=512, backend=args.backend)
    t2 = time.perf_counter()
    print(f"Calibration audit of {len(names)} models x {logits.shape[1]} samples x {logits.shape[2]} classes "
          f"(backend: {result.backend}; fleet built in {t1 - t0:.1f} s, audited in {1e3 * (t2 - t1):.1f} ms)\n")
    print(result.table(names))
    out = Path(args.out)
    png = reliability_diagram(result, out / "reliability.png", names, title="Stand-in fleet: reliability diagrams")
    (out / "calibration.json").write_text(__import__("json").dumps({"models": names, **result.to_dict()}, indent=1))
    print(f"\nwrote {png} and {out / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
