"""Plots. Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed).

matplotlib is the ``[plot]`` extra (``pip install 'vlmfast[plot]'``); it is imported on the first plot, not with
this module, and its absence raises an ImportError saying so."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from vlmfast._optional import require
from vlmfast.metrics.calibration_error import CalibrationResult


def reliability_diagram(
    result: CalibrationResult,
    path: str | os.PathLike,
    model_names: Sequence[str] | None = None,
    *,
    max_models: int = 24,
    ncols: int | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a reliability diagram (PNG) of every model in ``result``, as a grid of panels.

    Each panel shows per-bin accuracy against confidence: bars for accuracy, a black tick at the bin's mean
    confidence, the gap between them shaded red where the model is over-confident and amber where it is
    under-confident, the diagonal of perfect
    calibration, and underneath the share of samples per bin. ECE, ACE, MCE and accuracy are in
    the panel title. Equal-mass results (``binning="mass"``) are drawn as points at (mean confidence, accuracy).

    Args:
        result: a :class:`~vlmfast.metrics.CalibrationResult`.
        path: output file (``.png``; parent folders are created).
        model_names: one name per model (default ``model 0``, ``model 1``, ...).
        max_models: draw at most this many models (the first ones); the figure title says when some are left out.
        ncols: panels per row (default: up to 4).
        title: figure title.
        dpi: resolution.

    Returns:
        The path written.
    """
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"result: expected a CalibrationResult, got {type(result).__name__}")
    M = result.n_models
    names = list(model_names) if model_names is not None else [f"model {i}" for i in range(M)]
    if len(names) != M:
        raise ValueError(f"model_names: expected {M} names, got {len(names)}")
    if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
        raise ValueError(f"max_models: expected a positive int, got {max_models!r}")
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols: expected a positive int or None, got {ncols!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 0 < dpi <= 1200:
        raise ValueError(f"dpi: expected a number in (0, 1200], got {dpi!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "vlmfast.plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "vlmfast.plot").Figure
    shown = min(M, max_models)
    ncols = ncols or min(4, shown)
    nrows = math.ceil(shown / ncols)

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", torch.float64)
        return t.reshape(M, -1)

    acc_b, conf_b, cnt_b = rows(result.bin_accuracy), rows(result.bin_confidence), rows(result.bin_count)
    scalars = {k: rows(getattr(result, k)).flatten() for k in ("ece", "ace", "mce", "accuracy")}
    pct = "" if result.convention == "standard" else " (%)"
    n = result.n_bins
    edges = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1.0 / n

    fig = Figure(figsize=(3.6 * ncols, 4.2 * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(nrows, ncols, hspace=0.45, wspace=0.3, top=1.0 - 0.95 / (4.2 * nrows))
    for i in range(shown):
        inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=[3.2, 1], hspace=0.08)
        ax = fig.add_subplot(inner[0])
        axc = fig.add_subplot(inner[1], sharex=ax)
        acc, conf, cnt = acc_b[i].numpy(), conf_b[i].numpy(), cnt_b[i].numpy()
        nonempty = cnt > 0
        ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1, label="perfect calibration")
        share = cnt / max(cnt.sum(), 1)
        over = nonempty & (conf > acc)
        under = nonempty & (conf <= acc)
        if result.binning == "width":
            xs = centers
            ax.bar(xs[nonempty], acc[nonempty], width=width, color="#4C72B0", edgecolor="white", lw=0.5,
                   label="accuracy")
            ax.bar(xs[over], (conf - acc)[over], bottom=acc[over], width=width, color="#E24A33", alpha=0.45,
                   edgecolor="#B22222", lw=0.6, label="over-confident gap")
            ax.bar(xs[under], (acc - conf)[under], bottom=conf[under], width=width, color="#F5B041", alpha=0.9, zorder=3,
                   edgecolor="#B9770E", lw=0.6, label="under-confident gap")
            ax.hlines(conf[nonempty], xs[nonempty] - width / 2, xs[nonempty] + width / 2, color="black", lw=1.0,
                      label="mean confidence")
            axc.bar(xs[nonempty], share[nonempty], width=width, color="0.55", edgecolor="white", lw=0.5)
        else:
            ax.plot(conf[nonempty], acc[nonempty], "o-", color="#4C72B0", ms=4, label="accuracy (equal-mass bins)")
            ax.vlines(conf[over], acc[over], conf[over], color="#E24A33", lw=2, label="over-confident gap")
            ax.vlines(conf[under], conf[under], acc[under], color="#F5B041", lw=2, label="under-confident gap")
            axc.plot(conf[nonempty], share[nonempty], "o", color="0.4", ms=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{names[i]}\nECE {scalars['ece'][i]:.3f}  ACE {scalars['ace'][i]:.3f}  MCE {scalars['mce'][i]:.3f}{pct}\n"
            f"acc {scalars['accuracy'][i]:.3f}{pct}",
            fontsize=9,
        )
        ax.tick_params(labelbottom=False, labelsize=8)
        ax.grid(alpha=0.25)
        if i == 0:
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        axc.set_xlabel("confidence")
        axc.set_ylabel("share", fontsize=8)
        axc.set_ylim(0, max(float(share.max()), 1e-9) * 1.15)
        axc.tick_params(labelsize=8)
        axc.grid(alpha=0.25)
    head = title or f"Reliability diagrams ({result.n_bins} {result.binning} bins, N = {result.n_samples})"
    if shown < M:
        head += f" — first {shown} of {M} models"
    fig.suptitle(head, fontsize=11, y=1.0 - 0.1 / (4.2 * nrows))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def _image_grid(images: torch.Tensor, draw, path: str | os.PathLike, titles: Sequence[str] | None, *, ncols: int,
                title: str | None, dpi: int, tile: tuple[float, float]) -> Path:
    """A PNG grid of checked ``images (K, 3, H, W)`` (uint8 or float in [0, 1]); ``draw(ax, i)`` adds tile i's overlay
    on top of its image. Shared by :func:`heatmap_overlays` and :func:`region_gallery`."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "vlmfast.plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "vlmfast.plot").Figure
    k = images.shape[0]
    ncols = max(1, min(ncols, k))
    nrows = math.ceil(k / ncols)
    img = images.detach().cpu()
    img = (img.float() / 255.0 if img.dtype == torch.uint8 else img.float()).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    fig = Figure(figsize=(tile[0] * ncols, tile[1] * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    for i in range(k):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img[i], interpolation="nearest")
        draw(ax, i)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def heatmap_overlays(
    images: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor | None,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    alpha: float = 0.5,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG grid of heatmaps over their images: ``images (K, 3, H, W)`` uint8 (or float in [0, 1]),
    ``maps (K, H, W)`` in [0, 1] drawn with a colour map at ``alpha``, the ground-truth ``masks (K, H, W)`` bool
    outlined (or None), one ``titles`` entry per image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (K, 3, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    k = images.shape[0]
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != (k, *images.shape[-2:]):
        raise ValueError(f"maps: expected shape {(k, *images.shape[-2:])}, got "
                         f"{tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__}")
    if masks is not None and tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(f"masks: expected shape {tuple(maps.shape)}, got {tuple(masks.shape)}")
    if titles is not None and len(titles) != k:
        raise ValueError(f"titles: expected {k} titles, got {len(titles)}")
    if k == 0:
        raise ValueError("images: expected at least one image, got none")
    hm = maps.detach().cpu().float().numpy()

    def draw(ax, i):
        ax.imshow(hm[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        if masks is not None:
            ax.contour(masks[i].detach().cpu().float().numpy(), levels=[0.5], colors="white", linewidths=0.8)

    return _image_grid(images, draw, path, titles, ncols=ncols, title=title, dpi=dpi, tile=(2.4, 2.6))


def region_gallery(
    images: torch.Tensor,
    boxes: torch.Tensor,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 5,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG grid of regions: each tile is the whole image ``images[i]`` (``(K, 3, H, W)`` uint8 or float in
    [0, 1]) with its region ``boxes[i]`` (``(K, 4)`` ``[x1, y1, x2, y2]`` pixels) outlined, in the order given (e.g.
    the top spurious cluster's regions ranked by similarity to the medoid)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (K, 3, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    k = images.shape[0]
    if k == 0:
        raise ValueError("images: expected at least one image, got none")
    if not isinstance(boxes, torch.Tensor) or tuple(boxes.shape) != (k, 4):
        raise ValueError(f"boxes: expected shape {(k, 4)}, got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    if titles is not None and len(titles) != k:
        raise ValueError(f"titles: expected {k} titles, got {len(titles)}")
    Rectangle = require("matplotlib.patches", "vlmfast.plot").Rectangle
    bx = boxes.detach().cpu().float()

    def draw(ax, i):
        x1, y1, x2, y2 = (float(v) for v in bx[i])
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.5))

    return _image_grid(images, draw, path, titles, ncols=ncols, title=title, dpi=dpi, tile=(2.0, 2.2))


def scatter_panels(
    panels: Mapping[str, Sequence[tuple[float, float, str]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    xlim: tuple[float | None, float | None] | None = None,
    ylim: tuple[float | None, float | None] | None = None,
    ncols: int | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG grid of scatter plots, one panel per entry of ``panels`` (panel title -> points
    ``[(x, y, group), ...]``, e.g. one point per model, grouped by method).

    Every group has one colour and marker in every panel and one entry in the figure's legend (groups in order of
    first appearance). A point with a non-finite coordinate is left out; the panel's title says how many were.
    ``xlim`` / ``ylim``: fixed axis ranges, None for an automatic end (default: matplotlib's). ``ncols``: panels
    per row (default up to 3). Returns the path written (parent folders are created)."""
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"panels: expected a non-empty mapping title -> [(x, y, group)], got "
                         f"{type(panels).__name__ if not isinstance(panels, Mapping) else 'an empty mapping'}")
    clean: dict[str, list[tuple[float, float, str]]] = {}
    for name, points in panels.items():
        rows = []
        for i, pt in enumerate(points):
            if not isinstance(pt, (tuple, list)) or len(pt) != 3:
                raise ValueError(f"panels[{name!r}][{i}]: expected (x, y, group), got {pt!r:.60}")
            x, y, g = pt
            if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) \
                    or not isinstance(y, (int, float)):
                raise TypeError(f"panels[{name!r}][{i}]: expected numbers x, y, got {x!r:.30}, {y!r:.30}")
            rows.append((float(x), float(y), str(g)))
        clean[str(name)] = rows
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols: expected a positive int or None, got {ncols!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 0 < dpi <= 1200:
        raise ValueError(f"dpi: expected a number in (0, 1200], got {dpi!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "vlmfast.plot").FigureCanvasAgg
    Figure = require("matplotlib.figure", "vlmfast.plot").Figure
    groups = list(dict.fromkeys(g for rows in clean.values() for _, _, g in rows))
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
               "#64B5CD"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
    style = {g: (palette[i % len(palette)], markers[(i // len(palette)) % len(markers)])
             for i, g in enumerate(groups)}
    k = len(clean)
    ncols = min(ncols or 3, k)
    nrows = math.ceil(k / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (name, rows) in enumerate(clean.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shown = [(x, y, g) for x, y, g in rows if math.isfinite(x) and math.isfinite(y)]
        for g in groups:
            xs = [x for x, _, h in shown if h == g]
            ys = [y for _, y, h in shown if h == g]
            if xs:
                color, marker = style[g]
                ax.scatter(xs, ys, s=28, color=color, marker=marker, alpha=0.8, edgecolors="white",
                           linewidths=0.5)
        left_out = len(rows) - len(shown)
        ax.set_title(name + (f"\n({left_out} point{'s' if left_out != 1 else ''} without a value left out)"
                             if left_out else ""), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xlim is not None:
            ax.set_xlim(*xlim)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    if title:  # above the panels; savefig's tight bounding box makes room for it
        fig.suptitle(title, fontsize=11, y=1.0, va="bottom")
    if groups:  # below the panels; savefig's tight bounding box makes room for it
        Line2D = require("matplotlib.lines", "vlmfast.plot").Line2D
        handles = [Line2D([], [], ls="", marker=style[g][1], color=style[g][0], label=g) for g in groups]
        fig.legend(handles=handles, loc="upper center", ncol=min(4, len(groups)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


__all__ = ["heatmap_overlays", "region_gallery", "reliability_diagram", "scatter_panels"]
