"""Distribution shifts of the spurious-MNIST evaluation set.

* :func:`sklearn_digits` — a *source* shift: scikit-learn's 1,797 real 8×8 digit scans (grey levels 0..16)
  in place of MNIST, framed like MNIST (upsampled bilinearly to 20×20, grey levels scaled to 0..255, centred in a
  28×28 cell, i.e. a 4-pixel black border) and composited exactly like the ``test`` split (square on half of
  each class, independent of the class; same ground-truth fields).
* :func:`corrupt` / :func:`corrupted_test` — *pixel* shifts in the style of ImageNet-C: five kinds, severities 1..5
  of monotonically increasing strength.

Corruptions (images as floats ``x`` in [0, 1]; the result is clamped to [0, 1] and rounded back to uint8):

=============  =====================================================================  ==========================
``noise``      ``x + sigma * z``, z standard normal per pixel and channel             sigma .08 .12 .18 .26 .38
``blur``       separable gaussian blur (radius ceil(3 sigma), edge pixels replicated) sigma px 0.5 .8 1.1 1.5 2
``contrast``   ``(x - m) * c + m``, m the image's mean over pixels and channels       c .4 .3 .2 .1 .05
``invert``     ``(1 - a) * x + a * (1 - x)``: a blend toward the colour inversion     a .6 .7 .8 .9 1
``occlusion``  ``s`` black squares of side ``f * min(H, W)`` at random centres         f .15 .2 .25 .3 .35
=============  =====================================================================  ==========================

For one ``seed`` the random draws (noise field, patch centres) do not depend on the severity, so the change grows
pixel by pixel with it: noise scales the same field, occlusion patches at severity s contain those at s − 1.
``invert`` at severity 5 is the exact inversion ``255 - x`` (an involution); below 5 it is a partial blend (the
severity only sets the blend factor). The random draws depend on ``seed``, the kind and the images' positions in
the batch (processed in fixed chunks of 1,024), not on their content.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlmfast.data._dataset import SpuriousMNIST, check_has_data, check_int, check_seed, rng_for
from vlmfast.data.mnist import CELL, balanced_independent, render, spurious_mnist

CORRUPTIONS = ("noise", "blur", "contrast", "invert", "occlusion")
SEVERITY_PARAMS = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "invert": (0.6, 0.7, 0.8, 0.9, 1.0),
    "occlusion": (0.15, 0.2, 0.25, 0.3, 0.35),
}
_CHUNK = 1024
#: Side of the upsampled sklearn digit inside its 28×28 cell (MNIST's size-normalised box).
SKLEARN_DIGIT_SIZE = 20


# ---------------------------------------------------------------------- sklearn digits


@functools.lru_cache(maxsize=1)
def _sklearn_source() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits framed like MNIST: ``(1797, 28, 28)`` uint8 and labels ``(1797,)`` int64."""
    from vlmfast._optional import require

    d = require("sklearn.datasets", "vlmfast.data.sklearn_digits").load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) * (255.0 / 16.0))[:, None]
    up = F.interpolate(x, size=(SKLEARN_DIGIT_SIZE, SKLEARN_DIGIT_SIZE), mode="bilinear", align_corners=False)
    up = up[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    pad = (CELL - SKLEARN_DIGIT_SIZE) // 2
    out = np.zeros((up.shape[0], CELL, CELL), dtype=np.uint8)
    out[:, pad : pad + SKLEARN_DIGIT_SIZE, pad : pad + SKLEARN_DIGIT_SIZE] = up
    return out, np.asarray(d.target, dtype=np.int64)


def sklearn_digits(n: int | None = None, seed: int = 0, *, spurious_class: int = 9) -> SpuriousMNIST:
    """Spurious-MNIST-style composites of the scikit-learn digits (``split="shift-digits"``).

    Args:
        n: number of composites. None (default): each of the 1,797 digits exactly once, in random order. An int:
            balanced classes (``n // 10`` each, the remainder to random classes), digits drawn per class as evenly
            as possible (reused when ``n`` exceeds a class's ~180 digits).
        seed: non-negative int; sets the order, digits, layout, square flags and captions.
        spurious_class: recorded in the result (the class the square is audited against); the square itself
            is independent of the class: half of each class carries it (odd counts: with ``n`` given, rounded as in
            the ``test`` split, so V = 0 whenever the counts allow; with ``n=None`` a random side).

    Built in memory (about 0.1 s for all 1,797); ``source_ids`` index ``sklearn.datasets.load_digits()``.
    """
    seed = check_seed(seed)
    spurious_class = check_int("spurious_class", spurious_class, 0, 9)
    digits, targets = _sklearn_source()
    if n is None:
        rng = rng_for(seed, "sklearn-digits", "all")
        ids = rng.permutation(targets.size)
        labels = targets[ids]
        has = _half_per_class(labels, rng)
    else:
        n = check_int("n", n, 1)
        rng = rng_for(seed, "sklearn-digits", n)
        labels, has = balanced_independent(n, 10, rng)
        ids = np.empty(n, dtype=np.int64)
        for c in range(10):
            where = np.flatnonzero(labels == c)
            pool = np.flatnonzero(targets == c)
            reps = -(-where.size // pool.size) if where.size else 0
            seq = np.concatenate([rng.permutation(pool) for _ in range(reps)]) if reps else pool[:0]
            ids[where] = seq[: where.size]
    params = {"builder": "sklearn_digits", "n": n, "seed": seed}
    return render(
        digits[ids], labels, has, ids, rng, split="shift-digits", strength=0.0, spurious_class=spurious_class,
        source="sklearn-digits", params=params,
    )


def _half_per_class(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flags set on exactly half of the samples of each class (odd counts: the extra one with probability 1/2)."""
    has = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        where = rng.permutation(np.flatnonzero(labels == c))
        k = where.size // 2 + int(where.size % 2 and rng.random() < 0.5)
        has[where[:k]] = True
    return has


# ---------------------------------------------------------------------- corruptions


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    check_has_data("images", images)
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected dtype torch.uint8, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def _check_kind_severity(kind: Any, severity: Any) -> tuple[str, int]:
    if not isinstance(kind, str) or kind not in CORRUPTIONS:
        raise ValueError(f"kind: expected one of {CORRUPTIONS}, got {kind!r}")
    return kind, check_int("severity", severity, 1, 5)


def _blur_matrix(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``(size, size)`` matrix M with ``M @ v`` = v blurred by a gaussian of ``sigma`` pixels (radius
    ceil(3 sigma), weights summing to 1) with replicated edge pixels."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    rows = torch.arange(size).view(-1, 1).expand(size, k.numel())
    cols = (rows + t.long().view(1, -1)).clamp(0, size - 1)
    m = torch.zeros(size, size)
    m.index_put_((rows.reshape(-1), cols.reshape(-1)), k.repeat(size), accumulate=True)
    return m.to(device)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    # Separable blur as two small matmuls per image plane: on CPU several times faster than a 1-channel conv2d.
    h, w = x.shape[-2:]
    return _blur_matrix(h, sigma, x.device) @ x @ _blur_matrix(w, sigma, x.device).T


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupted copy of uint8 images ``(N, C, H, W)`` (any device; same shape, dtype and device).

    ``kind`` is one of :data:`CORRUPTIONS`, ``severity`` an int in 1..5; the parameters per severity are in
    :data:`SEVERITY_PARAMS` and the module docstring. Deterministic for a seed.
    """
    images = _check_images(images)
    kind, severity = _check_kind_severity(kind, severity)
    seed = check_seed(seed)
    p = SEVERITY_PARAMS[kind][severity - 1]
    n, c, h, w = images.shape
    if n == 0:
        return images.clone()
    if kind == "invert" and severity == 5:
        return 255 - images
    out = torch.empty_like(images)
    centres = None
    if kind == "occlusion":
        rng = rng_for(seed, "occlusion")
        centres = np.stack([rng.integers(0, h, size=(n, 5)), rng.integers(0, w, size=(n, 5))], axis=-1)
        centres = torch.from_numpy(centres)
    for start in range(0, n, _CHUNK):
        x = images[start : start + _CHUNK].float() / 255.0
        if kind == "noise":
            g = torch.Generator().manual_seed(int(rng_for(seed, "noise", start).integers(2**62)))
            z = torch.randn(x.shape, generator=g).to(x.device)
            y = x + p * z
        elif kind == "blur":
            y = _blur(x, p)
        elif kind == "contrast":
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            y = (x - m) * p + m
        elif kind == "invert":
            y = (1.0 - p) * x + p * (1.0 - x)
        else:
            y = x.clone()
            side = max(1, round(p * min(h, w)))
            cen = centres[start : start + _CHUNK].to(x.device)
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            hole = torch.zeros((x.shape[0], h, w), dtype=torch.bool, device=x.device)
            for k in range(severity):
                y0 = (cen[:, k, 0] - side // 2).view(-1, 1, 1)
                x0 = (cen[:, k, 1] - side // 2).view(-1, 1, 1)
                hole |= (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
            y[hole.unsqueeze(1).expand_as(y)] = 0.0
        out[start : start + _CHUNK] = (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return out


def corrupted_test(
    kind: str, severity: int, n: int | None = None, seed: int = 0, *, spurious_class: int = 9, cache: bool = True
) -> SpuriousMNIST:
    """The spurious-MNIST ``test`` split (``spurious_mnist("test", n, seed=seed)``) with :func:`corrupt`-ed
    images (corruption seed = ``seed``); ``split`` becomes ``"test-<kind>-<severity>"``. Labels, captions and every
    ground-truth field are unchanged: ``digit_masks``/``digit_boxes`` describe the *clean* digit, and a region
    label says what was drawn there, even where noise, blur or an occlusion patch hides it."""
    kind, severity = _check_kind_severity(kind, severity)
    ds = spurious_mnist("test", n=n, seed=seed, spurious_class=spurious_class, cache=cache)
    return ds.replace(
        images=corrupt(ds.images, kind, severity, seed=seed),
        split=f"test-{kind}-{severity}",
        params={**ds.params, "corruption": kind, "severity": severity},
    )
