"""Images/s of zoo's shard loader vs torchvision ImageFolder + DataLoader vs a bare decode-and-transform loop.

The same JPEG bytes (built-in `scenes`, written once as an ImageFolder tree and once as shards
with the bytes passed through), the same transform, the same number of worker processes. The
ceiling is the bare loop run in that many processes at once, measured (not one process times N):
no loader, no batching, no IPC; it decodes as zoo's loader does, so a faster decoder lifts it too,
and runs the whole transform per image. zoo's row is the loader as users call it,
`transform=SampleTransform(image=t)`, which runs t's dtype/normalise tail once per batch (same
batches, tested); the row below it runs all of t per image, as ImageFolder does.
Each loader is built once and iterated once per timed epoch (after a warm-up epoch), as a training loop
does: zoo's workers persist across epochs; ImageFolder is timed with torch's default (workers started
every epoch) and with persistent_workers=True. CPU µs/img adds up every process (main and workers):
steadier than img/s on a busy machine (running workers' CPU is read from /proc).

    python benchmarks/data_loader.py --n 5000 --size 64 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from zoo.data import loader, write_shards
from zoo.data.builtin import generate
from zoo.data.fields import decode_field
from zoo.data.transforms import SampleTransform
from zoo.data.writer import folder_samples

BARE_1 = "bare decode loop, 1 process"
CEILING = "bare decode loop, N processes"
FOLDER = "torchvision ImageFolder + DataLoader"
FOLDER_P = "  the same, persistent_workers=True"
ZOO = "zoo.data.loader (webdataset shards)"
ZOO_WHOLE = "  the same, whole transform per image"


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


class _ImageLabel:
    """The benchmark's transform applied whole to a zoo sample: a plain callable, which the loader cannot
    split, so dtype conversion and normalisation run per image as in the other loaders."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample):
        return {"image": self.transform(sample["image"]), "label": sample["label"]}


def zoo_loader(shards: Path, transform, batch: int, workers: int, whole: bool = False):
    """Built once and iterated once per timed epoch, as a training loop does (its workers persist).
    As users write it, `SampleTransform(image=t)`: the loader runs t's dtype/normalise tail once per
    batch (the same batches, tested); `whole=True` runs all of t per image."""
    t = _ImageLabel(transform) if whole else SampleTransform(image=transform)
    return loader(str(shards / "*.tar"), fields=("image", "label"), transform=t,
                  batch_size=batch, num_workers=workers, shuffle=1000)


def imagefolder_loader(folder: Path, transform, batch: int, workers: int, persistent: bool = False) -> DataLoader:
    ds = datasets.ImageFolder(str(folder), transform=transform)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=persistent)


def epoch_zoo(ld) -> int:
    return sum(len(b["label"]) for b in ld)


def epoch_imagefolder(dl: DataLoader) -> int:
    return sum(len(y) for _, y in dl)


def bare_loop(paths: list[Path], transform) -> None:
    """Read each file, decode it as zoo's loader does, transform it; nothing is kept or sent."""
    for p in paths:
        transform(decode_field("image", "jpg", p.read_bytes()))


def _bare_process(paths: list[Path], transform, start) -> None:
    torch.set_num_threads(1)
    start.wait()
    bare_loop(paths, transform)


def bench_bare(folder: Path, transform, processes: int) -> tuple[int, float]:
    """The bare loop over all files in `processes` processes at once, timed from a common start (process
    creation excluded) to the last one's end; (images, seconds)."""
    paths = sorted(folder.rglob("*.jpg"))
    if processes == 1:
        t = time.perf_counter()
        bare_loop(paths, transform)
        return len(paths), time.perf_counter() - t
    start = mp.Barrier(processes + 1)
    procs = [mp.Process(target=_bare_process, args=(paths[i::processes], transform, start)) for i in range(processes)]
    for p in procs:
        p.start()
    start.wait()
    t = time.perf_counter()
    for p in procs:
        p.join()
    return len(paths), time.perf_counter() - t


def _live_children_cpu() -> float:
    """CPU seconds so far of the child processes still running (persistent loader workers), from /proc."""
    total = 0.0
    for child in mp.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or it just exited (then RUSAGE_CHILDREN has it)
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _cpu_seconds() -> float:
    """CPU time of this process and its children: finished ones (workers started per epoch, bare-loop
    processes) and running ones (persistent workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _live_children_cpu()


def timed(run) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of every process) of one run."""
    cpu, t = _cpu_seconds(), time.perf_counter()
    out = run()
    wall, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    n, wall = out if isinstance(out, tuple) else (out, wall)  # the bare loops time themselves
    return n, wall, cpu


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
        # each loader is built once and iterated once per timed epoch, after one untimed warm-up epoch
        folder_dl = imagefolder_loader(folder, transform, args.batch, args.workers)
        folder_p = imagefolder_loader(folder, transform, args.batch, args.workers, persistent=args.workers > 0)
        zoo_ld = zoo_loader(shards, transform, args.batch, args.workers)
        zoo_whole = zoo_loader(shards, transform, args.batch, args.workers, whole=True)
        epoch_imagefolder(folder_dl), epoch_imagefolder(folder_p), epoch_zoo(zoo_ld), epoch_zoo(zoo_whole)
        runs = {
            BARE_1: lambda: bench_bare(folder, transform, 1),
            CEILING: lambda: bench_bare(folder, transform, args.workers),
            FOLDER: lambda: epoch_imagefolder(folder_dl),
            FOLDER_P: lambda: epoch_imagefolder(folder_p),
            ZOO: lambda: epoch_zoo(zoo_ld),
            ZOO_WHOLE: lambda: epoch_zoo(zoo_whole),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeats):  # interleaved and rotated, so drifting load hits every loader alike
            for name in names[r % len(names):] + names[: r % len(names)]:
                n, wall, cpu = timed(runs[name])
                assert n == args.n, f"{name} read {n} of {args.n} images"
                rates[name].append(n / wall)
                cpus[name].append(cpu / n * 1e6)
    med = {name: statistics.median(r) for name, r in rates.items()}
    ceiling, folder_rate = med[CEILING], med[FOLDER]
    print(f"\n{args.n} JPEGs of {args.size}px -> {args.crop}px crops, {args.workers} workers, batch {args.batch}; "
          f"median (min-max) of {args.repeats} interleaved, rotated runs\n")
    print(f"{'loader':40s} {'img/s':>7s} {'(min-max)':>13s} {'CPU µs/img':>11s} {'vs ImageFolder':>15s} {'vs ceiling':>11s}")
    for name, r in rates.items():
        print(f"{name:40s} {med[name]:7.0f} {f'({min(r):.0f}-{max(r):.0f})':>13s} {statistics.median(cpus[name]):11.0f} "
              f"{med[name] / folder_rate:14.2f}x {med[name] / ceiling:10.2f}x")
    print(f"\nceiling = the bare loop in {args.workers} processes at once = {ceiling:.0f} img/s "
          f"(one process x {args.workers} would be {med[BARE_1] * args.workers:.0f}, which assumes {args.workers} idle cores)")


if __name__ == "__main__":
    main()
