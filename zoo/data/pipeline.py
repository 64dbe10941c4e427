"""The one loader: webdataset shards -> decoded, transformed, batched samples.

Built on webdataset's tar reader with the defaults that avoid its known traps: an explicit rank
and worker split of a numerically shuffled shard list (every sample exactly once per epoch), a
resampled mode with a virtual epoch, randomness derived from (seed, epoch, rank, worker) only, and
every skipped sample counted by reason and reported, never silently dropped.

Batching spans the workers: each worker collates its full batches, and sends the samples left over
at its end with its WorkerReport; the main process merges those (in worker order) into the epoch's
last batches, so a rank drops at most one partial batch per epoch (none without `drop_last`).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from zoo.data.fields import FieldError
from zoo.data.reader import decode_sample, iter_raw_samples
from zoo.data.shards import expand_sources, shard_sizes
from zoo.errors import DataError, ZooError

log = logging.getLogger(__name__)


@dataclass
class WorkerReport:
    """Sent by each worker after its last batch: what it read, what it skipped by reason, and its
    transformed samples that did not fill a batch (`leftover`, batched by the main process)."""

    worker: int
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    leftover: list = field(default_factory=list)


@dataclass
class _Collated:
    """A batch with the number of samples that went into its collate (a custom collate may drop some)."""

    samples: int
    batch: Any


@dataclass
class _WorkerFailure:
    """A user error (ZooError) raised in a worker, passed to the main process to re-raise as is."""

    error: ZooError


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_of(*parts: Any) -> int:
    return random.Random("-".join(map(str, parts))).getrandbits(63)


class ShardStream(IterableDataset):
    """One epoch of samples for this (rank, worker), batched, followed by a WorkerReport."""

    def __init__(
        self,
        sources: list[list[str]],
        *,
        fields: Sequence[str],
        optional_fields: Sequence[str] | None,
        transform: Callable[[dict[str, Any]], Any] | None,
        batch_size: int | None,
        collate: Callable[[list[Any]], Any] | None,
        drop_last: bool,
        resampled: bool,
        epoch_samples: int | None,
        weights: Sequence[float] | None,
        shuffle: int,
        seed: int,
        rank: int,
        world_size: int,
        offsets: dict[str, int] | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
    ):
        self.sources = sources
        self.shards = [u for s in sources for u in s]
        self.fields = tuple(fields)
        self.optional_fields = None if optional_fields is None else tuple(optional_fields)
        self.transform = transform
        self.batch_size = batch_size
        self.collate = collate
        self.batch_transform = batch_transform
        self.drop_last = drop_last
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.offsets = offsets  # shard -> index of its first sample, when samples carry `__index__`
        self._epoch = torch.zeros((), dtype=torch.int64)  # moved to shared memory when workers start
        w = list(weights) if weights is not None else [1.0] * len(sources)
        # a source's weight is its share of samples drawn: spread it over its shards
        self.shard_weights = [w[i] / len(s) for i, s in enumerate(sources) for _ in s]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    # -- which shards this worker reads --------------------------------------------------------
    def my_shards(self, worker: int, num_workers: int) -> list[str]:
        """This (rank, worker)'s slice of the epoch's shard order, identical on every rank."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(_seed_of(self.seed, self.epoch, "shards")).shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def _resampled_shards(self, rng: random.Random) -> Iterator[str]:
        while True:
            yield rng.choices(self.shards, weights=self.shard_weights)[0]

    def _quota(self, worker: int, num_workers: int) -> int | None:
        """Samples this worker yields per virtual epoch in resampled mode."""
        if self.epoch_samples is None:
            return None
        per_rank = self.epoch_samples // self.world_size + (self.rank < self.epoch_samples % self.world_size)
        return per_rank // num_workers + (worker < per_rank % num_workers)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        if info is None:
            yield from self._stream(0, 1, in_worker=False)
            return
        _send_tensors_by_name()
        try:
            yield from self._stream(info.id, info.num_workers, in_worker=True)
        except ZooError as e:  # re-raised as is in the main process, not wrapped in a worker traceback
            try:
                pickle.dumps(e)
            except (pickle.PicklingError, TypeError, AttributeError):
                raise e from None
            yield _WorkerFailure(e)

    def _stream(self, worker: int, num_workers: int, in_worker: bool) -> Iterator[Any]:
        """This worker's full batches (or samples), then its WorkerReport with the leftover samples."""
        stream_seed = _seed_of(self.seed, self.epoch, self.rank, worker)
        rng = random.Random(stream_seed)
        report = WorkerReport(worker)
        if self.resampled:
            urls: Iterator[str] = self._resampled_shards(rng)
        else:
            urls = iter(self.my_shards(worker, num_workers))
        quota = self._quota(worker, num_workers) if self.resampled else None
        as_tensors = self.transform is None and self.collate is None and self.batch_size is not None
        with _torch_rng(stream_seed, in_worker=in_worker) as rng_scope:
            raws = iter_raw_samples(urls, report.skipped)
            if self.shuffle:  # shuffle the encoded bytes: a buffer of decoded images is many times larger
                raws = _shuffled(raws, self.shuffle, rng)
            samples = self._decoded(raws, report)
            scope = rng_scope or _no_swap  # transforms and collate draw from the loader's stream
            batch: list[Any] = []
            for sample in samples:
                if self.transform is not None:
                    with scope():
                        sample = self.transform(sample)
                elif as_tensors:
                    sample = _images_as_tensors(sample)
                report.samples += 1
                if self.batch_size is None:
                    yield sample
                else:
                    batch.append(sample)
                    if len(batch) == self.batch_size:
                        with scope(all_streams=True):
                            out = self._collate(batch)
                        yield _Collated(len(batch), out)
                        batch = []
                if quota is not None and report.samples >= quota:
                    break
        report.leftover = batch
        yield report

    def leftover_batches(self, leftover: list[Any], skipped: Counter) -> Iterator[Any]:
        """The workers' leftover samples (already in worker order) as full batches, then the last
        partial one unless `drop_last` (counted as `dropped_last_batch`). Collated in the main process
        from a stream seeded by (seed, epoch, rank), swapped in so training randomness is untouched."""
        bs = self.batch_size
        with _torch_rng(_seed_of(self.seed, self.epoch, self.rank, "leftover"), in_worker=False) as scope:
            for i in range(0, len(leftover), bs):
                chunk = leftover[i : i + bs]
                if len(chunk) < bs and self.drop_last:
                    skipped["dropped_last_batch"] += len(chunk)
                    return
                with scope(all_streams=True):
                    out = self._collate(chunk)
                yield _Collated(len(chunk), out)

    def _decoded(self, raws: Iterator[dict[str, Any]], report: WorkerReport) -> Iterator[dict[str, Any]]:
        for raw in raws:
            try:
                sample = decode_sample(raw, self.fields, self.optional_fields)
                if self.offsets is not None:  # shard offset + position in the shard (skipped samples count)
                    sample["__index__"] = self.offsets[raw["__url__"]] + raw["__pos__"]
                yield sample
            except FieldError as e:
                report.skipped[e.reason] += 1
                log.debug("skipped %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)

    def _collate(self, batch: list[Any]) -> Any:
        if self.collate is not None:
            out = self.collate(batch)
        else:
            try:
                out = default_collate(batch)
            except RuntimeError:
                _raise_on_mixed_sizes(batch)
                raise
        return out if self.batch_transform is None else self.batch_transform(out)


def _images_as_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Without a transform, PIL images become uint8 C×H×W tensors (torchvision's PILToTensor layout)
    so that batches collate; every other field keeps its decoded value."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    return {k: pil_to_tensor(v) if isinstance(v, Image.Image) else v for k, v in sample.items()}


def _raise_on_mixed_sizes(batch: list[Any]) -> None:
    """A DataError naming the field whose tensors differ in shape within a batch, if one does."""
    if not batch or not all(isinstance(s, dict) for s in batch):
        return
    for name, value in batch[0].items():
        if not torch.is_tensor(value):
            continue
        other = next((s[name] for s in batch if torch.is_tensor(s.get(name)) and s[name].shape != value.shape), None)
        if other is not None:
            raise DataError(
                f"field {name!r} holds tensors of shapes {tuple(value.shape)} and {tuple(other.shape)} in one batch; "
                "pass a transform that gives one size, e.g. transform=SampleTransform(image=eval_transform(model)) "
                "from zoo.data.transforms"
            ) from None


def _import_reader() -> None:
    """Import the tar reader's modules in the main process, once: workers started every epoch then
    inherit them instead of each importing them again (about 15 ms of CPU per worker per epoch)."""
    import webdataset.tariterators  # noqa: F401


def _send_tensors_by_name() -> None:
    """In a worker: share batches through named shared memory, not one file descriptor per tensor passed
    over a socket (the default), which costs the main process about twice as much per batch. Only this
    worker's sending changes; where torch's shm manager cannot run, the default stays."""
    import torch.multiprocessing as mp

    if mp.get_sharing_strategy() == "file_system" or "file_system" not in mp.get_all_sharing_strategies():
        return
    mp.set_sharing_strategy("file_system")
    try:
        torch.empty(1).share_memory_()
    except RuntimeError:
        mp.set_sharing_strategy("file_descriptor")


def _shuffled(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer driven by our own seeded rng."""
    buf: list[Any] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _no_swap(all_streams: bool = False) -> contextlib.nullcontext:
    """In a worker the seeded streams are the process's own: nothing to swap."""
    return contextlib.nullcontext()


@contextmanager
def _torch_rng(seed: int, in_worker: bool):
    """Seed the RNGs transforms draw from (torch, numpy, random). In a worker process they are ours alone;
    in the main process our streams are swapped in around each call so training randomness is untouched:
    torch's around every transform, numpy's and random's too around every collate (`scope(all_streams=True)`;
    timm's Mixup draws from numpy), since swapping numpy's state costs ~170 µs, too much per sample."""
    if in_worker:  # every generator a transform may draw from, anew each epoch (workers persist across epochs)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield None  # nothing to swap per sample
        return
    state = [torch.Generator().manual_seed(seed).get_state(), np.random.RandomState(seed % 2**32).get_state(),
             random.Random(seed).getstate()]

    @contextmanager
    def swapped(all_streams: bool = False):
        outer = torch.get_rng_state()
        torch.set_rng_state(state[0])
        if all_streams:
            outer_np, outer_py = np.random.get_state(), random.getstate()
            np.random.set_state(state[1]), random.setstate(state[2])
        try:
            yield
        finally:
            state[0] = torch.get_rng_state()
            torch.set_rng_state(outer)
            if all_streams:
                state[1], state[2] = np.random.get_state(), random.getstate()
                np.random.set_state(outer_np), random.setstate(outer_py)

    yield swapped


class Loader:
    """Iterate it for one epoch of batches; each new iteration is the next epoch (or `set_epoch`).

    `skipped` holds the skip counts of the last epoch by reason, `total_skipped` of all epochs.
    """

    def __init__(self, stream: ShardStream, num_workers: int, size: int | None):
        self.stream = stream
        self.num_workers = num_workers
        self.size = size
        self.skipped: Counter = Counter()
        self.total_skipped: Counter = Counter()
        self.samples_seen = 0
        self.last_batch_samples = 0  # samples that went into the last batch's collate
        self._next_epoch = 0
        self._dl: DataLoader | None = None

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        self.stream.epoch = self._next_epoch
        self._next_epoch += 1
        if self._dl is None:
            if self.num_workers:
                _import_reader()
                self.stream._epoch.share_memory_()  # the persistent workers read the epoch the main process sets
            # Workers are started once and kept: each epoch they re-read the epoch and reseed from it, so an
            # epoch's batches do not depend on the epochs before it (exact resume), and no epoch pays for a fork.
            self._dl = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                generator=torch.Generator().manual_seed(_seed_of(self.stream.seed, "loader")),
                persistent_workers=self.num_workers > 0,
            )
        dl = self._dl
        skipped: Counter = Counter()
        seen = 0
        reports: dict[int, WorkerReport] = {}
        for item in dl:
            if isinstance(item, WorkerReport):
                skipped.update(item.skipped)
                seen += item.samples
                reports[item.worker] = item
                continue
            if isinstance(item, _WorkerFailure):
                raise item.error
            yield self._unwrapped(item)
        leftover = [s for w in sorted(reports) for s in reports[w].leftover]  # worker order, not arrival order
        for item in self.stream.leftover_batches(leftover, skipped) if leftover else ():
            yield self._unwrapped(item)
        seen -= skipped["dropped_last_batch"]
        self.skipped = skipped
        self.total_skipped.update(skipped)
        self.samples_seen += seen
        if set(skipped) - {"dropped_last_batch"}:
            log.warning(
                "epoch %d: read %d samples, skipped %d (%s)",
                self.stream.epoch, seen, sum(skipped.values()), ", ".join(f"{n} {r}" for r, n in skipped.most_common()),
            )

    def _unwrapped(self, item: Any) -> Any:
        if isinstance(item, _Collated):
            self.last_batch_samples = item.samples
            return item.batch
        return item

    def samples_per_epoch(self) -> int | None:
        """Samples this rank yields per epoch, when known."""
        s = self.stream
        if s.resampled:
            return None if s.epoch_samples is None else s.epoch_samples // s.world_size
        return None if self.size is None else self.size // s.world_size

    def __len__(self) -> int:
        """Batches per epoch: with n samples on this rank, n // batch_size with drop_last, else ceil."""
        n = self.samples_per_epoch()
        if n is None:
            raise TypeError("length unknown: the shards have no sizes.json/_info.json/_stats.json; pass epoch_samples")
        bs = self.stream.batch_size
        if bs is None:
            return n
        return n // bs if self.stream.drop_last else -(-n // bs)


def loader(
    urls: str | list[str],
    *,
    fields: Sequence[str] = ("image",),
    optional_fields: Sequence[str] | None = (),
    transform: Callable[[dict[str, Any]], Any] | None = None,
    batch_size: int | None = 64,
    collate: Callable[[list[Any]], Any] | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    resampled: bool = False,
    epoch_samples: int | None = None,
    weights: Sequence[float] | str | None = None,
    shuffle: int = 1000,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    index: bool = False,
) -> Loader:
    """Batches from webdataset shards.

    `urls`: `dir/train-{000..015}.tar`, a glob, or `::`-joined sources (with `weights`, one per
    source, in resampled mode). `fields`: required fields (samples lacking one are skipped and
    counted); `optional_fields`: decoded when present (None: all). `transform(sample_dict)` runs in
    the workers; without a transform (and collate), batched images become uint8 C×H×W tensors and
    other fields collate as decoded (labels to a tensor, captions to a list). `batch_transform(batch)`
    runs in the workers on each collated batch; a `SampleTransform` of v2.Compose transforms is split
    so that their dtype/normalise tail runs there, once per batch, on uint8 images (the same values,
    less work and a quarter of the bytes between processes). Batches span the
    workers: per epoch and rank at most one batch is short, the last, dropped with `drop_last`.
    `shuffle`: shuffle-buffer size, and shard-order shuffling, 0 for neither.
    `resampled=True` draws shards with replacement forever; `epoch_samples` then sets the virtual
    epoch. Ranks default to torch.distributed's. `index=True` gives every sample `__index__`, its
    position in the dataset (shard offset + position in the shard: the same in every epoch, on every
    rank, whatever the shuffle); it needs per-shard counts (sizes.json, _info.json or *_stats.json).
    """
    if batch_transform is not None and batch_size is None:
        raise DataError("batch_transform runs on collated batches: give a batch_size, or fold it into transform")
    sources = expand_sources(urls)
    if batch_transform is None and collate is None and batch_size is not None:
        from zoo.data.transforms import SampleTransform

        if isinstance(transform, SampleTransform):
            transform, batch_transform = transform.split()
    if isinstance(weights, str):
        weights = [float(w) for w in weights.split("::")]
    if weights is not None:
        if len(weights) != len(sources):
            raise DataError(f"{len(weights)} weights for {len(sources)} '::'-joined sources; give one weight per source")
        if not resampled:
            raise DataError("source weights need resampled=True (weighted sampling draws shards with replacement)")
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise DataError(f"source weights must be >= 0 and not all 0, got {list(weights)}")
    r, w = dist_info()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    n_shards = sum(len(s) for s in sources)
    if not resampled and n_shards < world_size * max(num_workers, 1):
        raise DataError(
            f"{n_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} worker(s): every worker needs a shard. "
            f"Use num_workers<={max(n_shards // world_size, 1)}, resampled=True, or write more, smaller shards"
        )
    if resampled and epoch_samples is None:
        raise DataError("resampled=True streams forever: give epoch_samples (samples per virtual epoch)")
    urls = [u for s in sources for u in s]
    sizes = shard_sizes(urls)
    offsets = None
    if index:
        if sizes is None:
            raise DataError(f"index=True needs each shard's sample count, and {urls[0]}'s folder has no sizes.json, "
                            "_info.json or *_stats.json; write one (zoo shards check prints the counts)")
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        offsets = dict(zip(urls, starts))
    stream = ShardStream(
        sources,
        fields=fields,
        optional_fields=optional_fields,
        transform=transform,
        batch_size=batch_size,
        collate=collate,
        drop_last=drop_last,
        resampled=resampled,
        epoch_samples=epoch_samples,
        weights=weights,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        offsets=offsets,
        batch_transform=batch_transform,
    )
    return Loader(stream, num_workers, None if sizes is None else sum(sizes))


__all__ = ["loader", "Loader", "WorkerReport"]
