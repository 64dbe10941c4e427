"""`digits`: scikit-learn's real handwritten digits (1797 8x8 images in 16 grey levels, bundled with
scikit-learn, so nothing is downloaded), upsampled for a small but real downstream task.

The train/val split is fixed (stratified 80/20, drawn once from `SPLIT_SEED`, the same for every
`seed`): `SPLIT_SIZES` = 1438 train / 359 val images. `seed` only shuffles the order of a split, so
the first `n` samples are a seed-dependent random subset; asking for more than a split holds
returns the whole split. Pixels 0..16 are scaled to 0..255, resized bicubically to `size` and
replicated to RGB (white digits on black).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np
from PIL import Image

from zoo.data.builtin._common import check_args, coarse_labels, key

TAG = 3
NUM_CLASSES = 10
FIELDS = ("image", "label", "meta")
SPLIT_SEED = 20240607
VAL_FRACTION = 0.2
SPLIT_SIZES = {"train": 1438, "val": 359}  # checked against the data on first use
COARSE_CLASSES = 5  # digits_coarse: digit d belongs to super-class d % 5 ({0, 5}, {1, 6}, ...)
COARSE_FIELDS = ("image", "label", "fine", "meta")


@functools.lru_cache(maxsize=1)
def _data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """{"train": ..., "val": ...}: sorted indices into sklearn's digits; per class, round(20%) go to val."""
    _, target = _data()
    rng = np.random.default_rng(SPLIT_SEED)
    val = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(target == c)
        val.extend(rng.permutation(idx)[: int(round(VAL_FRACTION * len(idx)))].tolist())
    is_val = np.zeros(len(target), bool)
    is_val[val] = True
    out = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}
    sizes = {k: len(v) for k, v in out.items()}
    if sizes != SPLIT_SIZES:  # pragma: no cover - only if scikit-learn ever changes the data
        raise RuntimeError(f"digits split sizes {sizes} differ from the registered {SPLIT_SIZES}")
    return out


@functools.lru_cache(maxsize=8)
def _order(seed: int, sid: int, split: str) -> np.ndarray:
    idx = split_indices()[split]
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, TAG, 1 + sid, 0]).permutation(idx)


def render(index: int, size: int) -> Image.Image:
    """sklearn digit `index` as an RGB `size` x `size` image."""
    images, _ = _data()
    img = Image.fromarray(images[index], "L")
    if size != 8:
        img = img.resize((size, size), Image.BICUBIC)
    return img.convert("RGB")


def generate(n: int, *, seed: int = 0, size: int = 32, split: str = "train",
             start: int = 0) -> Iterator[dict[str, Any]]:
    """Samples `start .. start + n - 1` of the split's seed-shuffled order, fewer if the split ends first."""
    sid = check_args("digits", n, seed, size, split, start)
    order = _order(int(seed), sid, split)
    _, target = _data()

    def it() -> Iterator[dict[str, Any]]:
        for i in range(start, min(start + n, len(order))):
            src = int(order[i])
            yield {"__key__": key(i), "image": render(src, size), "label": int(target[src]),
                   "meta": {"source_index": src}}

    return it()


def generate_coarse(n: int, *, seed: int = 0, size: int = 32, split: str = "train",
                    start: int = 0) -> Iterator[dict[str, Any]]:
    """`digits` labelled by 5 super-classes of two unrelated digits each (d % 5); `fine` keeps the digit."""
    return coarse_labels(generate(n, seed=seed, size=size, split=split, start=start), COARSE_CLASSES, "digits_coarse")
