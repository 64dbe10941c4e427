"""Built-in datasets: generated (or, for digits, bundled with scikit-learn), never downloaded, and
deterministic from a seed.

    from zoo.data.builtin import generate
    for s in generate("scenes", 1000, seed=0, size=32, split="train"):
        s["__key__"], s["image"], s["label"], s["caption"], s["mask"], s["thermal"], s["depth"]

| name       | classes                | fields                                                   |
|------------|------------------------|----------------------------------------------------------|
| `fractals` | `num_classes` IFS (10) | image, label, meta                                       |
| `scenes`   | 6 shape types          | image, label, caption, meta, mask, thermal, depth        |
| `digits`   | 10 digits (real data)  | image, label, meta (split sizes: 1438 train / 359 val)   |
| `fractals_coarse` | 4 super-classes of 5 fractal classes each | image, label (coarse), fine, meta |
| `digits_coarse` | 5 super-classes of 2 digits each (d % 5) | image, label (coarse), fine, meta |

A sample is a dict of decoded values under zoo field names (`zoo.data.fields`): `__key__` is the
sample index as 9 digits, `image` an RGB PIL image of `size` x `size`, `label` an int, `meta` a
JSON-serialisable dict, `mask` a uint8 numpy array, other modalities PIL "L" images. Sample `i`
depends only on (seed, split, i): not on `n`, on `start`, or on the order of generation, so
`generate(name, n, start=k)` can split the work between processes. "train" and "val" hold different
instances of the same classes. `digits` returns fewer than `n` samples when the split has fewer;
the registered meta `max_samples` gives each split's size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from zoo.data.builtin import digits, fractals, scenes
from zoo.registry import DATASETS

__all__ = ["generate", "materialize", "resolve_source", "BUILTIN_PREFIX", "digits", "fractals", "scenes"]

BUILTIN_PREFIX = "builtin:"  # a data source 'builtin:NAME' means generated built-in shards

DATASETS.register(
    "fractals", fractals.generate, num_classes=fractals.NUM_CLASSES, fields=fractals.FIELDS,
    description="FractalDB-style classes of random iterated function systems (chaos game), with "
                "per-instance perturbation, rotation/flip, colour and background; `num_classes` kw (default 10)",
    paper="Kataoka et al. 2020; Anderson & Farrell 2022 (Improving Fractal Pre-training)",
)
DATASETS.register(
    "scenes", scenes.generate, num_classes=scenes.NUM_CLASSES, classes=scenes.SHAPES, fields=scenes.FIELDS,
    version=2,  # 2: a long caption in meta["captions"]; materialized folders carry the version
    description="1-3 coloured shapes on textured backgrounds; label = shape of the largest; mask, exact/short/noisy/"
                "long captions with quality scores, thermal-like and depth-like renderings of the same scene",
)
DATASETS.register(
    "fractals_coarse", fractals.generate_coarse, num_classes=fractals.COARSE_CLASSES, fields=fractals.COARSE_FIELDS,
    fine_classes=fractals.COARSE_FINE,
    description="20 fractal classes labelled by 4 super-classes (fine % 4), so a class is multi-modal by "
                "construction; the fine class in `fine` (LOOK's experiment: transfer to classes not trained on)",
)
DATASETS.register(
    "digits_coarse", digits.generate_coarse, num_classes=digits.COARSE_CLASSES, fields=digits.COARSE_FIELDS,
    fine_classes=digits.NUM_CLASSES, max_samples=dict(digits.SPLIT_SIZES),
    description="the real digits labelled by 5 super-classes of two unrelated digits (d % 5: {0, 5}, {1, 6}, ...), "
                "so a class is multi-modal; the digit in `fine` (LOOK's experiment)",
)
DATASETS.register(
    "digits", digits.generate, num_classes=digits.NUM_CLASSES, classes=tuple(str(d) for d in range(10)),
    fields=digits.FIELDS, max_samples=dict(digits.SPLIT_SIZES),
    description="scikit-learn's real 8x8 handwritten digits upsampled to `size`, "
                "fixed stratified 80/20 train/val split",
)


def generate(name: str, n: int, *, seed: int = 0, size: int = 32, split: str = "train",
             **kw: Any) -> Iterator[dict[str, Any]]:
    """`n` samples (fewer where a split holds fewer) of built-in dataset `name` as decoded field dicts.

    Raises `zoo.errors.UnknownNameError` (with close names) for an unknown dataset or split,
    ValueError for a bad n / seed / size. Extra keywords go to the dataset (`num_classes=` for
    fractals; `start=` for all: the index of the first sample).
    """
    return DATASETS.get(name).factory(n, seed=seed, size=size, split=split, **kw)


def materialize(name: str, split: str, n: int, *, root: str | Path, size: int = 32, seed: int = 0) -> str:
    """Generate `n` samples of built-in `name` into shards under `root` once (later calls reuse them)
    and return their pattern. The folder appears whole: written aside, then renamed. Sample i depends
    only on (name, split, seed, i), so the same data comes back on every machine."""
    meta = DATASETS.get(name).meta
    n = min(int(n), meta.get("max_samples", {}).get(split, int(n)))
    version = f"-v{meta['version']}" if meta.get("version") else ""  # a new version is generated afresh
    folder = Path(root) / f"{name}{version}-{split}-n{n}-{size}px-seed{seed}"
    if not (folder / "sizes.json").is_file():
        from zoo.data.writer import write_shards

        tmp = folder.with_name(f".{folder.name}.part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        info = {"name": name, "split": split, "seed": seed, "size": size, "num_classes": meta.get("num_classes"),
                "source": "zoo.data.builtin", **({"classes": list(meta["classes"])} if meta.get("classes") else {})}
        per_shard = max(1, min(1000, -(-n // 8)))  # at least 8 shards: enough for a few loader workers
        write_shards(generate(name, n, seed=seed, size=size, split=split), tmp, maxcount=per_shard, total=n,
                     info=info, desc=f"{name}/{split}")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / "*.tar")


def resolve_source(source: str, *, split: str, root: str | Path, size: int = 32, n: int = 10_000) -> str:
    """A shard pattern, with 'builtin:NAME' turned into materialized built-in shards of that split; in
    '::'-joined sources (a weighted mix) each 'builtin:NAME' part is."""
    if "::" in str(source):
        return "::".join(resolve_source(s, split=split, root=root, size=size, n=n) for s in str(source).split("::"))
    if not str(source).startswith(BUILTIN_PREFIX):
        return source
    return materialize(str(source)[len(BUILTIN_PREFIX):], split, n, root=root, size=size)
