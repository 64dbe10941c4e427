"""Images/s of zoo's shard loader vs torchvision ImageFolder + DataLoader vs a bare PIL decode loop.

The same JPEG bytes (built-in `scenes`, written once as an ImageFolder tree and once as shards
with the bytes passed through), the same transform, the same number of worker processes.

    python benchmarks/data_loader.py --n 5000 --size 64 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from zoo.data import loader, write_shards
from zoo.data.builtin import generate
from zoo.data.shards import folder_samples


def make_transform(crop: int) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(crop, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def prepare(root: Path, n: int, size: int) -> tuple[Path, Path]:
    folder = root / "folder"
    for i, s in enumerate(generate("scenes", n, size=size, seed=0)):
        d = folder / f"class_{s['label']:02d}"
        d.mkdir(parents=True, exist_ok=True)
        s["image"].save(d / f"{i:06d}.jpg", quality=90)
    _, samples, total = folder_samples(folder)
    write_shards(samples, root / "shards", maxcount=500, total=total)
    return folder, root / "shards"


def bench_zoo(shards: Path, transform, batch: int, workers: int) -> tuple[int, float]:
    def tf(sample):
        return {"image": transform(sample["image"]), "label": sample["label"]}

    ld = loader(str(shards / "*.tar"), fields=("image", "label"), transform=tf, batch_size=batch,
                num_workers=workers, shuffle=1000)
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in ld)
    return n, time.perf_counter() - t


def bench_imagefolder(folder: Path, transform, batch: int, workers: int) -> tuple[int, float]:
    ds = datasets.ImageFolder(str(folder), transform=transform)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(y) for _, y in dl)
    return n, time.perf_counter() - t


def bench_bare_loop(folder: Path, transform) -> tuple[int, float]:
    """One process, no loader: read the file, decode with PIL, transform. Times `workers` give the ceiling."""
    paths = sorted(folder.rglob("*.jpg"))
    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            transform(im.convert("RGB"))
    return len(paths), time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="JPEG images (default 5000)")
    p.add_argument("--size", type=int, default=64, help="stored image side (default 64)")
    p.add_argument("--crop", type=int, default=32, help="transform output side (default 32)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per loader (median reported)")
    args = p.parse_args()
    torch.set_num_threads(1)
    transform = make_transform(args.crop)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = prepare(Path(tmp), args.n, args.size)
        runs = {
            "bare PIL decode loop, 1 process": lambda: bench_bare_loop(folder, transform),
            "torchvision ImageFolder + DataLoader": lambda: bench_imagefolder(folder, transform, args.batch, args.workers),
            "zoo.data.loader (webdataset shards)": lambda: bench_zoo(shards, transform, args.batch, args.workers),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeats):  # interleaved and rotated, so drifting load hits every loader alike
            for name in names[r % len(names):] + names[: r % len(names)]:
                run = runs[name]
                n, sec = run()
                assert n == args.n, f"{name} read {n} of {args.n} images"
                rates[name].append(n / sec)
    med = {name: statistics.median(r) for name, r in rates.items()}
    ceiling = med["bare PIL decode loop, 1 process"] * args.workers
    folder_rate = med["torchvision ImageFolder + DataLoader"]
    print(f"\n{args.n} JPEGs of {args.size}px -> {args.crop}px crops, {args.workers} workers, batch {args.batch}; "
          f"median (min-max) of {args.repeats} interleaved, rotated runs\n")
    print(f"{'loader':40s} {'img/s':>7s} {'(min-max)':>13s} {'vs ImageFolder':>15s} {'vs ceiling':>11s}")
    for name, r in rates.items():
        print(f"{name:40s} {med[name]:7.0f} {f'({min(r):.0f}-{max(r):.0f})':>13s} "
              f"{med[name] / folder_rate:14.2f}x {med[name] / ceiling:10.2f}x")
    print(f"\nceiling = the bare loop's rate x {args.workers} workers = {ceiling:.0f} img/s (perfect scaling, no IPC)")

if __name__ == "__main__":
    main()
