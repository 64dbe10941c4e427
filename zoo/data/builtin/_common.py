"""Shared plumbing of the built-in datasets: argument checks, split ids, and seeding.

Every random number a built-in dataset draws comes from a generator seeded by a fixed-length
tuple, so a sample depends only on (seed, dataset, split, index), never on how many samples were
asked for or in which order:

    class c:              default_rng([seed_lo, seed_hi, tag, 0, c])
    sample i of a split:  default_rng([seed_lo, seed_hi, tag, 1 + split_id, i])

(`tag` is the dataset's own number, so two datasets never share a stream; the tuples all have the
same length because numpy's SeedSequence treats `[a, b]` and `[a, b, 0]` as the same seed.)
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from zoo.errors import UnknownNameError
from zoo.registry import close_matches

SPLITS = ("train", "val")


def split_id(split: str, dataset: str) -> int:
    """0 for "train", 1 for "val"; an unknown split is an UnknownNameError with a suggestion."""
    if split in SPLITS:
        return SPLITS.index(split)
    hint = close_matches(str(split), list(SPLITS)) or list(SPLITS)
    raise UnknownNameError(f"unknown split {split!r} for dataset {dataset!r}; did you mean: {', '.join(hint)}?")


def check_args(dataset: str, n: int, seed: int, size: int, split: str, start: int = 0) -> int:
    """Validate the common arguments; returns the split id."""
    for name, value in (("n", n), ("seed", seed), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{dataset}: {name} must be an integer >= 0, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"{dataset}: size must be an integer >= 8 pixels, got {size!r}")
    if seed >= 2**64:
        raise ValueError(f"{dataset}: seed must be < 2**64, got {seed!r}")
    return split_id(split, dataset)


def _seed_words(seed: int) -> list[int]:
    seed = int(seed)
    return [seed & 0xFFFFFFFF, seed >> 32]


def class_rng(seed: int, tag: int, c: int) -> np.random.Generator:
    """The generator of class `c`'s parameters (the same for every split)."""
    return np.random.default_rng(_seed_words(seed) + [tag, 0, int(c)])


def sample_rng(seed: int, tag: int, split: int, i: int) -> np.random.Generator:
    """The generator of sample `i` of split `split` (an id from `split_id`)."""
    return np.random.default_rng(_seed_words(seed) + [tag, 1 + int(split), int(i)])


def key(i: int) -> str:
    """The webdataset key of sample `i`: 9 digits, zero-padded (img2dataset's convention)."""
    return f"{int(i):09d}"


def coarse_labels(samples: Iterator[dict[str, Any]], n_coarse: int, dataset: str) -> Iterator[dict[str, Any]]:
    """Relabel by super-class: `label` becomes fine % n_coarse (unrelated fine classes merged, so a class is
    multi-modal by construction) and `fine` keeps the fine class, for transfer to classes not trained on."""
    for s in samples:
        fine = s["label"]
        yield {**s, "label": fine % n_coarse, "fine": fine,
               "meta": {**s.get("meta", {}), "fine": fine, "coarse": fine % n_coarse, "dataset": dataset}}
