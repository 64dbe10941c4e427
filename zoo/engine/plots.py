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
