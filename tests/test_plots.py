"""zoo.engine.plots: every picture is a readable PNG of a sensible size, shows what it claims where it
claims it (pixels sampled in the saved file), and leaves no figure behind in pyplot."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.engine import plots

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode in ("RGB", "RGBA")
        return np.asarray(img.convert("RGB")).astype(int)


def box(fig, ax) -> tuple[float, float, float, float]:
    """Where an axes lands in the saved PNG: (left, top, right, bottom) in pixels, y downwards."""
    bb = ax.get_window_extent()
    return bb.x0, fig.bbox.height - bb.y1, bb.x1, fig.bbox.height - bb.y0


def at(arr: np.ndarray, b, fx: float, fy: float) -> np.ndarray:
    """The pixel at fraction (fx, fy) of box b."""
    left, top, right, bottom = b
    return arr[int(top + fy * (bottom - top)), int(left + fx * (right - left))]


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) colours in [0, 1] -> what a model sees with MEAN/STD."""
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_curve_png(tmp_path):
    xs = list(range(20))
    ys = [math.exp(-i / 5) if i % 4 else float("nan") for i in xs]  # gaps where the metric was not logged
    arr = pixels(plots.curve(xs, ys, tmp_path / "a" / "b" / "loss.png", title="loss (MAE)", size=(500, 300)))
    assert arr.shape == (300, 500, 3)
    assert (np.abs(arr - [0x1F, 0x77, 0xB4]).sum(-1) < 30).sum() > 100  # the line is drawn
    fig = plots.curve_figure(xs, ys, title="t", ylabel="loss")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("step", "loss")
    assert pixels(plots.curve([0, 1], [float("nan")] * 2, tmp_path / "empty.png", title="t")).shape == (360, 640, 3)


def test_image_grid_shows_unnormalised_colours_in_place(tmp_path):
    first = torch.zeros(1, 3, 8, 8)
    first[:, :, :4] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)  # top half red
    first[:, :, 4:] = torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1)  # bottom half blue
    second = torch.full((1, 3, 8, 8), 0.0) + torch.tensor([0.2, 0.7, 0.3]).view(1, 3, 1, 1)  # green
    row = normalised(torch.cat([first, second]))
    rows = [row, normalised(torch.full((2, 3, 8, 8), 0.5))]
    path = plots.image_grid(rows, tmp_path / "grid.png", mean=MEAN, std=STD, scale=4)
    arr = pixels(path)
    fig = plots.image_grid_figure(rows, mean=MEAN, std=STD, scale=4)
    assert arr.shape[:2] == (fig.bbox.height, fig.bbox.width)
    assert arr.shape[0] >= 2 * 8 * 4 and arr.shape[1] >= 2 * 8 * 4
    (a, b), (c, d) = [fig.axes[:2], fig.axes[2:]]
    assert (box(fig, a)[2] - box(fig, a)[0]) == pytest.approx(8 * 4, abs=1)  # each pixel drawn 4 x 4
    close = lambda got, rgb: np.abs(got - 255 * np.array(rgb)).max() <= 2  # noqa: E731
    assert close(at(arr, box(fig, a), 0.5, 0.25), [0.9, 0.2, 0.1])
    assert close(at(arr, box(fig, a), 0.5, 0.75), [0.1, 0.3, 0.8])
    assert close(at(arr, box(fig, b), 0.5, 0.5), [0.2, 0.7, 0.3])
    assert close(at(arr, box(fig, c), 0.5, 0.5), [0.5] * 3) and close(at(arr, box(fig, d), 0.2, 0.8), [0.5] * 3)
    assert not close(arr[0, 0], [0.9, 0.2, 0.1])  # no tile reaches the corner: there is a margin

    labelled = plots.image_grid(rows, tmp_path / "labelled.png", mean=MEAN, std=STD, scale=4,
                                row_labels=["original", "reconstruction"])
    lab = pixels(labelled)
    assert lab.shape[0] == arr.shape[0] and lab.shape[1] > arr.shape[1] + 50  # room for the labels
    assert (lab[:, : lab.shape[1] - arr.shape[1]].sum(-1) < 300).any()  # and dark text in it
    with pytest.raises(ValueError, match="row labels"):
        plots.image_grid(rows, tmp_path / "x.png", mean=MEAN, std=STD, row_labels=["one"])


def test_image_grid_of_grey_images(tmp_path):
    grey = torch.full((3, 1, 6, 6), 0.25)
    arr = pixels(plots.image_grid([grey], tmp_path / "g.png", mean=[0.0], std=[1.0]))
    fig = plots.image_grid_figure([grey], mean=[0.0], std=[1.0])
    assert np.abs(at(arr, box(fig, fig.axes[1]), 0.5, 0.5) - 64).max() <= 2


def test_attention_maps_hot_corners(tmp_path):
    images = normalised(torch.rand(2, 3, 16, 16))
    maps = torch.zeros(2, 2, 4, 4)
    maps[:, 0, 0, 0] = 1.0  # head 0 looks at the top-left patch
    maps[:, 1, -1, -1] = 1.0  # head 1 at the bottom-right one
    path = plots.attention_maps(images, maps, tmp_path / "attn" / "a.png", mean=MEAN, std=STD, title="DINO")
    arr = pixels(path)
    fig = plots.attention_figure(images, maps, mean=MEAN, std=STD, title="DINO")
    assert arr.shape[:2] == (fig.bbox.height, fig.bbox.width)
    assert len(fig.axes) == 2 * 4  # 2 images x (image, head 0, head 1, mean)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "head 0", "head 1", "mean"]
    assert fig.axes[0].get_window_extent().width >= 100  # small images are drawn large
    bright = lambda ax, fx, fy: at(arr, box(fig, ax), fx, fy).sum()  # noqa: E731
    for row in (fig.axes[:4], fig.axes[4:]):
        _, head0, head1, mean = row
        assert bright(head0, 0.05, 0.05) > bright(head0, 0.95, 0.95) + 200
        assert bright(head1, 0.95, 0.95) > bright(head1, 0.05, 0.05) + 200
        assert bright(mean, 0.05, 0.05) > bright(mean, 0.5, 0.5) + 200
        assert bright(mean, 0.95, 0.95) > bright(mean, 0.5, 0.5) + 200
    flat = plots.attention_maps(images, maps.flatten(2), tmp_path / "flat.png", mean=MEAN, std=STD, title="DINO")
    assert np.array_equal(pixels(flat), arr)  # (B, heads, h*w) is read as the square grid
    with pytest.raises(ValueError, match="square"):
        plots.attention_maps(images, torch.zeros(2, 2, 15), tmp_path / "bad.png", mean=MEAN, std=STD)


def test_histogram_marker(tmp_path):
    values = torch.randn(300, generator=torch.Generator().manual_seed(0)).tolist() + [float("nan")]
    plain = pixels(plots.histogram(values, tmp_path / "h" / "plain.png", title="scores", size=(400, 250)))
    marked = pixels(plots.histogram(values, tmp_path / "marked.png", title="scores", marker=0.5,
                                    marker_label="keep >= 0.5", size=(400, 250)))
    assert plain.shape == marked.shape == (250, 400, 3)
    is_red = lambda a: (np.abs(a - [214, 39, 40]).sum(-1) < 20).sum()  # noqa: E731
    assert is_red(plain) == 0 and is_red(marked) > 100  # the threshold line (and its legend entry)
    fig = plots.histogram_figure(values, title="t", marker=0.5, marker_label="keep")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("value", "count")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["keep"]
    for empty in ([], [0.5, 0.5], [float("nan")]):
        assert pixels(plots.histogram(empty, tmp_path / "e.png", title="t", marker=0.5)).shape == (360, 640, 3)


def test_bars(tmp_path):
    groups = ["zero-shot top-1", "retrieval R@1 (i2t)", "dense mIoU"]
    series = {"alt": [30.0, 20.0, 40.0], "quality": [35.0, float("nan"), 41.0]}
    errors = {"alt": [1.0, 2.0, 1.0], "quality": [2.0, 1.0, 0.5]}
    arr = pixels(plots.bars(groups, series, tmp_path / "b" / "bars.png", title="alt vs quality", errors=errors))
    assert arr.shape == (400, 720, 3)
    for colour in plots.COLOURS[:2]:
        rgb = np.array([int(colour[i: i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(arr - rgb).sum(-1) < 10).sum() > 500, colour
    fig = plots.bars_figure(groups, series, title="t", errors=errors)
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["30.0", "20.0", "40.0", "35.0", "41.0"])  # no bar and no label for the NaN
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alt", "quality"]


def test_no_figure_leaks_and_lazy_import(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.curve([0, 1], [1, 0], tmp_path / "c.png", title="t")
    plots.image_grid([torch.zeros(2, 3, 4, 4)], tmp_path / "g.png", mean=MEAN, std=STD)
    plots.attention_maps(torch.zeros(1, 3, 4, 4), torch.rand(1, 2, 2, 2), tmp_path / "a.png", mean=MEAN, std=STD)
    plots.histogram([1, 2, 3], tmp_path / "h.png", title="t", marker=2)
    plots.bars(["a"], {"s": [1.0]}, tmp_path / "b.png", title="t")
    assert plt.get_fignums() == before == []
    code = "import sys, zoo, zoo.engine.plots; assert 'matplotlib' not in sys.modules, 'imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True)
