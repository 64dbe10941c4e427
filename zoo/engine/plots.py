"""Pictures of a run, drawn with matplotlib: metric curves, image grids, attention maps,
histograms and grouped bars, saved as PNG.

Each picture has a `*_figure` builder that returns a `matplotlib.figure.Figure` (for notebooks,
or to read where its panels are) and a function that saves it to a path. Figures are built with
the object API on the Agg canvas, never through pyplot, so nothing is registered in pyplot's
global figure list and nothing leaks; matplotlib is imported only when a picture is drawn, so
`import zoo` does not pay for it.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

DPI = 100
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
RED = "#d62728"  # threshold markers
ATTENTION_CMAP = "inferno"  # dark = no attention, bright = most attention
GAP = 4  # pixels between and around the tiles of a grid


# -- plumbing ----------------------------------------------------------------------------------------
def _new_figure(size: tuple[int, int], *, layout: str | None = "constrained") -> Figure:
    """A figure of exactly `size` = (width, height) pixels on an Agg canvas, not known to pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG of its exact pixel size (parent folders created), then release its artists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    finally:
        fig.clear()
    return path


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_pixels(path: str | Path) -> np.ndarray:
    """A saved picture as an (H, W, 3) uint8 array, e.g. for TensorBoard's `add_image(..., dataformats="HWC")`."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised -> (N, H, W, C') in [0, 1]: C' = 1 for grey images, else the first 3 channels."""
    x = x.detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0, 1)
    x = x[:, :1] if x.shape[1] < 3 else x[:, :3]
    return x.permute(0, 2, 3, 1)


def _grid_figure(
    n_rows: int, n_cols: int, tile: tuple[int, int], *, label_w: int = 0, header_h: int = 0, title_h: int = 0
) -> tuple[Figure, list[list]]:
    """A figure of n_rows x n_cols tiles of `tile` = (width, height) pixels each, placed at whole pixels
    (so images are drawn crisply, pixel for pixel); returns the figure and its axes, row by row."""
    tw, th = tile
    width = label_w + n_cols * tw + (n_cols + 1) * GAP
    height = title_h + header_h + n_rows * th + (n_rows + 1) * GAP
    fig = _new_figure((width, height), layout=None)
    axes = []
    for r in range(n_rows):
        row = []
        top = title_h + header_h + GAP + r * (th + GAP)
        for c in range(n_cols):
            left = label_w + GAP + c * (tw + GAP)
            ax = fig.add_axes((left / width, 1 - (top + th) / height, tw / width, th / height))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
    return fig, axes


def _show(ax, pixels: torch.Tensor) -> None:
    """An (H, W, 1|3) image in [0, 1] on a tile, nearest-neighbour so no colour is blended."""
    arr = pixels.numpy()
    if arr.shape[-1] == 1:
        ax.imshow(arr[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    else:
        ax.imshow(arr, interpolation="nearest", aspect="auto")


# -- curves --------------------------------------------------------------------------------------------
def curve_figure(
    xs: Sequence[float], ys: Sequence[float], *, title: str, ylabel: str = "value", size: tuple[int, int] = (640, 360)
) -> Figure:
    """A line chart of ys over steps; non-finite points (steps where the metric was not logged) are left out."""
    fig = _new_figure(size)
    ax = fig.add_subplot()
    x, y = _finite(xs, ys)
    ax.plot(x, y, color=COLOURS[0], linewidth=1.5, marker="o" if len(x) == 1 else None)
    if not x:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig


def curve(
    xs: Sequence[float],
    ys: Sequence[float],
    path: str | Path,
    *,
    title: str,
    ylabel: str | None = None,
    size: tuple[int, int] = (640, 360),
) -> Path:
    """A metric curve saved as PNG; the y label is `ylabel`, by default the file's stem (the trainer
    names each curve's file after its metric)."""
    path = Path(path)
    return save(curve_figure(xs, ys, title=title, ylabel=ylabel or path.stem, size=size), path)


# -- image grids -----------------------------------------------------------------------------------------
def image_grid_figure(
    rows: Sequence[torch.Tensor],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: int = 3,
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """Rows of (N, C, H, W) normalised images, un-normalised and shown N to a row, each pixel as a
    scale x scale block, with optional row labels on the left; axes are row by row in `fig.axes`."""
    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    pixels = [_to_pixels(r, mean, std) for r in rows]
    h, w = pixels[0].shape[1:3]
    n_cols = max(p.shape[0] for p in pixels)
    label_w = 12 + 8 * max(map(len, row_labels)) if row_labels else 0
    fig, axes = _grid_figure(len(rows), n_cols, (w * scale, h * scale), label_w=label_w)
    for r, (row_pixels, row_axes) in enumerate(zip(pixels, axes)):
        for ax, img in zip(row_axes, row_pixels):
            _show(ax, img)
        if row_labels:
            box = row_axes[0].get_position()
            fig.text(box.x0 - GAP / fig.bbox.width, (box.y0 + box.y1) / 2, row_labels[r], ha="right", va="center",
                     fontsize=10)
    return fig


def image_grid(
    rows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: int = 3,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Rows of (N, C, H, W) normalised images (e.g. original / masked / reconstruction / pasted) as a PNG grid."""
    return save(image_grid_figure(rows, mean=mean, std=std, scale=scale, row_labels=row_labels), path)


# -- attention maps --------------------------------------------------------------------------------------
def attention_figure(
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
) -> Figure:
    """One row per image: the image, each head's attention map upsampled to the image (nearest, so a
    patch stays a block), and the mean over heads; each map is scaled to its own min..max.

    `images` (B, C, H, W) normalised; `maps` (B, heads, h, w) — or (B, heads, h*w) with a square grid —
    the CLS token's attention over the patches. Axes are row by row in `fig.axes`.
    """
    maps = maps.detach().float().cpu()
    if maps.ndim == 3:
        side = math.isqrt(maps.shape[-1])
        if side * side != maps.shape[-1]:
            raise ValueError(f"maps of shape {tuple(maps.shape)}: {maps.shape[-1]} patches is not a square grid")
        maps = maps.unflatten(-1, (side, side))
    if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be (B, heads, h, w) for {images.shape[0]} images, got {tuple(maps.shape)}")
    pixels = _to_pixels(images, mean, std)
    h, w = pixels.shape[1:3]
    heads = maps.shape[1]
    panels = torch.cat([maps, maps.mean(1, keepdim=True)], dim=1)
    panels = F.interpolate(panels, size=(h, w), mode="nearest")
    scale = max(1, math.ceil(128 / max(h, w)))  # tiles of about 128 px whatever the image size
    header_h, title_h = 20, 26 if title else 0
    fig, axes = _grid_figure(len(pixels), heads + 2, (w * scale, h * scale), header_h=header_h, title_h=title_h)
    for b, row_axes in enumerate(axes):
        _show(row_axes[0], pixels[b])
        for ax, m in zip(row_axes[1:], panels[b]):
            ax.imshow(m.numpy(), cmap=ATTENTION_CMAP, vmin=float(m.min()), vmax=float(m.max()),
                      interpolation="nearest", aspect="auto")
    names = ["image", *(f"head {i}" for i in range(heads)), "mean"]
    for ax, name in zip(axes[0], names):
        ax.set_title(name, fontsize=10, pad=3)
    if title:
        fig.suptitle(title, y=1 - 4 / fig.bbox.height, va="top", fontsize=11)
    return fig


def attention_maps(
    images: torch.Tensor,
    maps: torch.Tensor,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
) -> Path:
    """DINO-style attention pictures as a PNG: per image, the image, each head's CLS attention and their mean."""
    return save(attention_figure(images, maps, mean=mean, std=std, title=title), path)


# -- histograms ------------------------------------------------------------------------------------------
def histogram_figure(
    values: Sequence[float],
    *,
    title: str,
    bins: int = 40,
    marker: float | None = None,
    marker_label: str = "",
    xlabel: str = "value",
    size: tuple[int, int] = (640, 360),
) -> Figure:
    """A histogram of the finite `values`, with an optional labelled red vertical line at `marker`."""
    fig = _new_figure(size)
    ax = fig.add_subplot()
    vals = [float(v) for v in values if math.isfinite(float(v))]
    has_marker = marker is not None and math.isfinite(marker)
    if vals:
        lo, hi = min(vals), max(vals)
        if has_marker:
            lo, hi = min(lo, marker), max(hi, marker)
        if hi - lo < 1e-12:  # one distinct value: a bin of width 1 around it
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(vals, bins=max(int(bins), 1), range=(lo, hi), color=COLOURS[0], edgecolor="white", linewidth=0.5)
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, color="gray")
    if has_marker:
        ax.axvline(marker, color=RED, linewidth=2, label=marker_label or f"{marker:.4g}")
        ax.legend(loc="upper right", framealpha=0.9)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def histogram(
    values: Sequence[float],
    path: str | Path,
    *,
    title: str,
    bins: int = 40,
    marker: float | None = None,
    marker_label: str = "",
    xlabel: str = "value",
    size: tuple[int, int] = (640, 360),
) -> Path:
    """A histogram saved as PNG, e.g. of CLIP scores with the filtering threshold as the marker."""
    fig = histogram_figure(values, title=title, bins=bins, marker=marker, marker_label=marker_label, xlabel=xlabel,
                           size=size)
    return save(fig, path)


# -- grouped bars ----------------------------------------------------------------------------------------
def bars_figure(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    errors: dict[str, Sequence[float]] | None = None,
    ylabel: str = "",
    size: tuple[int, int] = (720, 400),
) -> Figure:
    """Grouped bars: a group per entry of `groups`, a coloured bar per series with an optional ± error
    bar, each value printed above its bar, and a legend; non-finite values draw no bar."""
    fig = _new_figure(size)
    ax = fig.add_subplot()
    names = list(series)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [float(v) for v in series[name]]
        errs = [float(e) for e in (errors or {}).get(name, [0.0] * len(vals))]
        keep = [j for j, v in enumerate(vals) if math.isfinite(v)]
        xs = [j - 0.4 + (i + 0.5) * width for j in keep]
        yerr = [errs[j] if math.isfinite(errs[j]) else 0.0 for j in keep]
        bar = ax.bar(xs, [vals[j] for j in keep], width * 0.95, yerr=yerr if any(yerr) else None, capsize=3,
                     color=COLOURS[i % len(COLOURS)], label=name, error_kw={"linewidth": 1})
        ax.bar_label(bar, labels=[f"{vals[j]:.1f}" for j in keep], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), [textwrap.fill(str(g), 14) for g in groups], fontsize=9)
    ax.margins(y=0.12)  # room for the value labels
    ax.set_title(title)
    if ylabel:
        ax.set_ylabel(ylabel)
    if names:
        ax.legend(loc="best", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    errors: dict[str, Sequence[float]] | None = None,
    ylabel: str = "",
    size: tuple[int, int] = (720, 400),
) -> Path:
    """A grouped bar chart (e.g. metrics of two caption policies, mean ± std over seeds) saved as PNG."""
    return save(bars_figure(groups, series, title=title, errors=errors, ylabel=ylabel, size=size), path)
