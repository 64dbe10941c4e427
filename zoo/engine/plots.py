"""Pictures of a run, drawn with Pillow (no plotting dependency): metric curves and image grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw


def curve(xs: Sequence[float], ys: Sequence[float], path: str | Path, *, title: str, size=(640, 360)) -> Path:
    """A line chart of ys over xs with min/max labels, saved as PNG."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    d.text((left, 8), title, fill="black")
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = (w - left - right) / max(x1 - x0, 1e-12)
        sy = (h - top - bottom) / max(y1 - y0, 1e-12)
        line = [(left + (x - x0) * sx, h - bottom - (y - y0) * sy) for x, y in pts]
        d.rectangle([left, top, w - right, h - bottom], outline="gray")
        if len(line) > 1:
            d.line(line, fill=(31, 119, 180), width=2)
        d.text((4, top - 6), f"{y1:.4g}", fill="black")
        d.text((4, h - bottom - 6), f"{y0:.4g}", fill="black")
        d.text((left, h - bottom + 8), f"step {x0:g}", fill="black")
        d.text((w - right - 80, h - bottom + 8), f"step {x1:g}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def image_grid(rows: Sequence[torch.Tensor], path: str | Path, *, mean, std, scale: int = 3) -> Path:
    """Rows of (N, C, H, W) normalised images side by side (e.g. original / masked / reconstruction)."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    tiles = []
    for r in rows:
        x = (r.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
        x = torch.cat(list(x), dim=2)  # N images left to right: (C, H, N*W)
        tiles.append(x)
    grid = torch.cat(tiles, dim=1)  # rows top to bottom
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def histogram(
    values: Sequence[float],
    path: str | Path,
    *,
    title: str,
    bins: int = 40,
    marker: float | None = None,
    marker_label: str = "",
    size=(640, 360),
) -> Path:
    """A histogram of `values` (non-finite ones left out), with an optional vertical marker line
    (e.g. a filtering threshold) drawn in red and labelled, saved as PNG."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if vals:
        lo, hi = min(vals), max(vals)
        if marker is not None and math.isfinite(marker):
            lo, hi = min(lo, marker), max(hi, marker)
        if hi - lo < 1e-12:  # one value: a bin of width 1 around it
            lo, hi = lo - 0.5, hi + 0.5
        bins = max(int(bins), 1)
        counts = [0] * bins
        for v in vals:
            counts[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
        peak = max(counts)
        pw, ph = w - left - right, h - top - bottom
        d.rectangle([left, top, w - right, h - bottom], outline="gray")
        for i, c in enumerate(counts):
            if c:
                x0 = left + i * pw / bins
                x1 = left + (i + 1) * pw / bins
                d.rectangle([x0 + 1, h - bottom - c / peak * ph, max(x1 - 1, x0 + 1), h - bottom], fill=(31, 119, 180))
        d.text((4, top - 6), str(peak), fill="black")
        d.text((4, h - bottom - 6), "0", fill="black")
        d.text((left, h - bottom + 8), f"{lo:.4g}", fill="black")
        d.text((w - right - 60, h - bottom + 8), f"{hi:.4g}", fill="black")
        if marker is not None and math.isfinite(marker):
            x = left + (marker - lo) / (hi - lo) * pw
            d.line([(x, top), (x, h - bottom)], fill=(214, 39, 40), width=2)
            label = marker_label or f"{marker:.4g}"
            at = (min(x + 4, w - right - 6 * len(label) - 4), top + 4)
            d.rectangle(d.textbbox(at, label), fill="white")  # readable over the bars
            d.text(at, label, fill=(214, 39, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    errors: dict[str, Sequence[float]] | None = None,
    size=(720, 400),
) -> Path:
    """A grouped bar chart: one group per entry of `groups`, one coloured bar per series (with an
    optional ± error tick), values printed on the bars and a legend; saved as PNG."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    w, h = size
    left, right, top, bottom = 40, 20, 50, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    names = list(series)
    for i, name in enumerate(names):
        d.rectangle([left + i * 150, 28, left + i * 150 + 10, 38], fill=colours[i % len(colours)])
        d.text((left + i * 150 + 16, 27), name, fill="black")
    err = {n: [float(e) for e in (errors or {}).get(n, [0.0] * len(groups))] for n in names}
    peak = max([float(series[n][j]) + err[n][j] for n in names for j in range(len(groups))
                if math.isfinite(float(series[n][j]))] + [1e-12])
    pw, ph = w - left - right, h - top - bottom
    d.line([(left, h - bottom), (w - right, h - bottom)], fill="gray")
    slot = pw / max(len(groups), 1)
    bar_w = slot * 0.8 / max(len(names), 1)
    for j, group in enumerate(groups):
        x_group = left + j * slot + slot * 0.1
        for i, name in enumerate(names):
            v = float(series[name][j])
            if not math.isfinite(v):
                continue
            x0 = x_group + i * bar_w
            y = h - bottom - max(v, 0.0) / peak * ph
            d.rectangle([x0, y, x0 + bar_w - 2, h - bottom], fill=colours[i % len(colours)])
            e = err[name][j]
            if e > 0:
                xc = x0 + (bar_w - 2) / 2
                d.line([(xc, y - e / peak * ph), (xc, y + e / peak * ph)], fill="black", width=1)
            d.text((x0, y - 12), f"{v:.1f}", fill="black")
        d.text((x_group, h - bottom + 8), group, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
