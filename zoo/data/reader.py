"""Reading shards: tar members, damage recovery, samples grouped by key, every loss counted.

One reader for every shard (local through mmap, remote through webdataset's `gopen`; plain or
gzip/bz2/xz). It never crashes on bad bytes: after a bad header, an early end marker or a cut it
resumes at the next valid header and counts what was lost against the recorded size (see
`iter_raw_samples`). `check_shards` reports the same per shard.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import re
import tarfile
from collections import Counter
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from zoo.data.fields import FieldError, decode_field, field_of
from zoo.data.shards import REMOTE_PREFIXES, expand_sources, known_size, recorded_size
from zoo.progress import progress

log = logging.getLogger(__name__)
# -- reading -------------------------------------------------------------------------------------
# Skip reasons for samples lost to damage in the tar itself (decoding adds reasons per field):
#   damaged_sample    a sample next to a damaged stretch with fewer members than its intact neighbour: dropped
#   truncated_sample  the sample cut by a truncation (without a recorded size: one per cut shard)
#   lost_in_damage    whole samples inside damaged stretches: exact with a recorded size, else one per stretch
#                     that dropped no sample (an estimate: the true number is unknown)
#   missing_samples   an intact-looking shard that holds fewer samples than its recorded size
LOST_REASONS = ("damaged_sample", "truncated_sample", "lost_in_damage", "missing_samples")
# Reasons counted once per shard (or per member), not per sample.
SHARD_REASONS = frozenset(
    {"bad_tar", "trailing_garbage", "empty_shard", "missing_shard", "unreadable_shard", "duplicate_member"}
)


def counts_samples(reason: str) -> bool:
    """Whether a skip reason counts samples (lost or undecodable) rather than shards."""
    return reason not in SHARD_REASONS and not reason.startswith("error_")


def classify_exception(exn: BaseException) -> str:
    """The skip-counter reason for an exception raised while reading a shard."""
    if isinstance(exn, (tarfile.TarError, EOFError)) or "unexpected end of data" in str(exn):
        return "bad_tar"
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "duplicate_member"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    return f"error_{type(exn).__name__}"


_WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members (e.g. __index__)
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_TYPES = frozenset(bytes([c]) for c in b"01234567gxLKSVMN\0")
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


class Member(NamedTuple):
    """A regular tar member: its name, its bytes (None in a header-only scan), its header's offset."""

    name: str
    data: bytes | None
    offset: int


class Damage(NamedTuple):
    """A damaged stretch [begin, end) of a tar: `bad_header`, `early_end` (zero blocks, then members), `bad_end`
    (a damaged end marker), `truncated` (`name`: the member cut, if known), `trailing_garbage`, `empty` (0 bytes)."""

    kind: str
    begin: int
    end: int
    name: str | None = None


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of a valid header block, else None: octal fields that parse, the POSIX
    checksum right, a known type and a name."""
    # Signed checksums, which a few ancient tars wrote, are refused: random bytes over a header's zero
    # fields match them about once in 2500 tries.
    try:
        stored = _octal(block[148:156])
        size = _octal(block[124:136])
    except ValueError:  # a damaged octal field
        return None
    if stored != sum(block) - sum(block[148:156]) + 256:  # the checksum field counts as spaces
        return None
    kind = block[156:157]
    if size < 0 or kind not in _TYPES or not block[0]:
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if block[257:262] == b"ustar" and kind not in (b"L", b"K"):
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name, size, kind


class _MapSource:
    """Forward reads from a memory-mapped local file: one copy per member, skips are free."""

    def __init__(self, buf: Any, size: int):
        self.buf, self.size, self.pos, self.error = buf, size, 0, None

    def read(self, n: int, pad: int = 0) -> bytes:
        """`n` bytes (fewer at the end of the file), then `pad` more skipped."""
        start = self.pos
        end = start + n
        if end > self.size:
            end = self.size
        self.pos = end + pad if end + pad < self.size else self.size
        return self.buf[start:end]

    def skip(self, n: int) -> int:
        start = self.pos
        self.pos = min(start + n, self.size)
        return self.pos - start


class _StreamSource:
    """Forward reads from a file object (a remote or compressed shard). A read error ends the stream
    early, so it reads as a truncation, and is kept in `error` to be counted."""

    def __init__(self, f: Any, head: bytes = b""):
        self.f, self.head, self.pos, self.error = f, head, 0, None

    def read(self, n: int, pad: int = 0) -> bytes:
        """`n` bytes (fewer at the end of the stream), then `pad` more skipped."""
        parts, want = [], n
        if self.head:
            parts.append(self.head[:want])
            self.head = self.head[want:]
            want -= len(parts[0])
        while want > 0 and self.error is None:
            try:
                chunk = self.f.read(want)
            except Exception as exn:  # network, decompression or pipe status: the rest is unreadable
                self.error = exn
                break
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self.pos += len(data)
        if pad and len(data) == n:
            self.skip(pad)
        return data

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            got = len(self.read(min(n - done, 1 << 20)))
            if not got:
                break
            done += got
        return done


class _Chained(io.RawIOBase):
    """A file object that replays bytes already read from a stream, then reads on."""

    def __init__(self, head: bytes, f: Any):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.head[: len(b)] if self.head else self.f.read(len(b))
        self.head = self.head[len(data) :]
        b[: len(data)] = data
        return len(data)


def _decompressed(head: bytes, f: Any) -> Any | None:
    """A decompressing reader when the stream starts with a gzip, bz2 or xz signature, else None."""
    for magic, module in _COMPRESSED:
        if head.startswith(magic):
            raw = io.BufferedReader(_Chained(head, f))
            if module == "gzip":
                return gzip.GzipFile(fileobj=raw)
            if module == "bz2":
                return bz2.BZ2File(raw)
            return lzma.LZMAFile(raw)
    return None


@contextmanager
def _open_tar(url: str) -> Iterator[_MapSource | _StreamSource]:
    """A forward reader over one shard: mmap for a local tar, a stream (webdataset's gopen for remote
    URLs), decompressed when gzip/bz2/xz."""
    import mmap

    with ExitStack() as stack:
        if url.startswith(REMOTE_PREFIXES):
            from webdataset.gopen import gopen

            f = gopen(url, "rb")
            stack.callback(_close_quietly, f)
            head = f.read(6)
            unpacked = _decompressed(head, f)
            yield _StreamSource(unpacked) if unpacked is not None else _StreamSource(f, head)
            return
        f = stack.enter_context(open(url, "rb"))
        size = os.fstat(f.fileno()).st_size
        head = f.read(6)
        unpacked = _decompressed(head, f) if size else None
        if unpacked is not None:
            yield _StreamSource(unpacked)
        elif size == 0:
            yield _MapSource(b"", 0)
        else:
            yield _MapSource(stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)), size)


def _close_quietly(f: Any) -> None:
    try:  # a remote pipe reports its exit status on close; a shard left early must not raise here
        f.close()
    except Exception as exn:
        log.debug("closing %s: %s", f, exn)


def _next_header(src: _MapSource | _StreamSource) -> tuple[tuple[int, bytes] | None, int | None]:
    """Scan forward block by block for the next valid header: ((offset, block), or None at the end of the
    file) and the offset of the first other non-zero block passed (None if there was none)."""
    data_at = None
    while True:
        off = src.pos
        block = src.read(_BLOCK)
        if len(block) < _BLOCK:
            if data_at is None and block.strip(b"\0"):
                data_at = off
            return None, data_at
        if block == _ZERO_BLOCK:
            continue
        if _header(block) is not None:
            return (off, block), data_at
        if data_at is None:
            data_at = off


def _entries(src: _MapSource | _StreamSource, want_data: bool = True) -> Iterator[Member | Damage]:
    """Members and damaged stretches of one tar in file order; after a bad header, or zero blocks with data
    behind them, reading resumes at the next valid 512-byte-aligned header (ustar, GNU long names, pax)."""
    long_name: str | None = None
    pax_size: int | None = None
    pending: tuple[int, bytes] | None = None
    while True:
        if pending is None:
            off = src.pos
            block = src.read(_BLOCK)
        else:
            (off, block), pending = pending, None
        if len(block) < _BLOCK:  # no end-of-archive marker
            if off or block:
                yield Damage("truncated", off, src.pos)
            elif src.error is None:  # (a stream that fails at once is an unreadable shard, counted as such)
                yield Damage("empty", 0, 0)
            return
        if block == _ZERO_BLOCK:  # the end-of-archive marker, unless a header follows
            pending, data_at = _next_header(src)
            if pending is None:
                if data_at is not None:
                    yield Damage("trailing_garbage", data_at, src.pos)
                return
            yield Damage("early_end", off, pending[0])
            long_name = pax_size = None
            continue
        head = _header(block)
        if head is None:
            pending, data_at = _next_header(src)
            if pending is None and data_at is None:  # only zero blocks behind it: the end marker itself was hit
                yield Damage("bad_end", off, off + _BLOCK)
                return
            yield Damage("bad_header", off, src.pos if pending is None else pending[0])
            if pending is None:
                return
            long_name = pax_size = None
            continue
        name, size, kind = head
        regular = kind in _REGULAR
        if regular and pax_size is not None:
            size = pax_size
        if want_data or not regular:
            data = src.read(size, -size % _BLOCK)
            short = len(data) < size
        else:
            data = None
            short = src.skip(size) < size
            src.skip(-size % _BLOCK)
        if short:
            yield Damage("truncated", off, src.pos, (long_name or name) if regular else None)
            return
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            for record in data.decode("utf-8", "surrogateescape").split("\n"):
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
                elif key == "size" and value.isdigit():
                    pax_size = int(value)
            continue
        if not regular:  # directories, links, global pax headers
            long_name = pax_size = None
            continue
        name = long_name or name
        long_name = pax_size = None
        if not _WDS_META.match(name):
            yield Member(name, data, off)


def tar_entries(url: str, want_data: bool = True) -> Iterator[Member | Damage]:
    """Members and damaged stretches of one shard (local or remote), in file order: see `Member`, `Damage`."""
    with _open_tar(url) as src:
        yield from _entries(src, want_data)


class _Grouper:
    """A shard's members grouped by consecutive key (as webdataset's group_by_keys); a sample next to damage
    is kept only when it has the members of the nearest intact sample, else dropped and counted."""
    # `__pos__` numbers every sample slot in file order: dropped samples too, and the samples lost inside
    # each damaged stretch when `lost_in(stretch index)` can tell (from the recorded size).

    def __init__(self, url: str, lost_in: Callable[[int], int] | None = None):
        self.url = url
        self.lost_in = lost_in
        self.regions: list[Damage] = []
        self.hit: list[bool] = []  # a sample touching the stretch was dropped
        self.dropped: Counter = Counter()
        self.yielded = 0
        self.duplicates = 0
        self._pos = 0
        self._cur: dict[str, Any] | None = None
        self._cur_regions: list[int] = []
        self._cut = False
        self._touch: list[int] = []  # stretches the next new sample follows
        self._unplaced: list[int] = []  # stretches whose lost samples have no positions yet
        self._last: dict[str, Any] | None = None  # the last intact sample: what a whole sample holds
        self._expected: frozenset | None = None  # its keys, when no intact sample was seen
        self._queue: list[tuple[dict[str, Any], list[int]]] = []  # waiting for an intact sample to compare with

    def samples(self, entries: Iterable[Member | Damage]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import (
            base_plus_ext as split_name,  # key and extension, as webdataset splits them
        )

        for e in entries:
            if type(e) is not Member:
                yield from self._damage(e)
                continue
            prefix, suffix = split_name(e.name)
            if prefix is None:
                continue
            suffix = suffix.lower()
            cur = self._cur
            if cur is not None and prefix == cur["__key__"]:
                if suffix in cur:  # webdataset raises "duplicate file name" and goes on without it
                    self.duplicates += 1
                else:
                    cur[suffix] = e.data
                self._touch = []  # a stretch inside this sample: it touches the open sample only
                continue
            if cur is not None:
                if self._cur_regions or self._queue:
                    yield from self._close()
                else:  # the fast path: an intact sample
                    cur["__pos__"] = self._pos
                    self._pos += 1
                    self._last = cur
                    self.yielded += 1
                    yield cur
            if self._unplaced:
                self._place_lost()
            self._cur = {"__key__": prefix, "__url__": self.url, suffix: e.data}
            self._cur_regions, self._touch = self._touch, []
        if self._cur is not None:
            yield from self._close()
        self._unplaced = []
        yield from self._judge_queue()

    def _damage(self, d: Damage) -> Iterator[dict[str, Any]]:
        r = len(self.regions)
        self.regions.append(d)
        self.hit.append(False)
        cur = self._cur
        if d.kind == "truncated" and d.name is not None:
            from webdataset.tariterators import base_plus_ext

            if cur is not None and base_plus_ext(d.name)[0] == cur["__key__"]:
                self._cut = True  # the open sample lost its last member(s)
                self._cur_regions.append(r)
                return
            if cur is not None:  # the cut member began a new sample: the open one is whole
                yield from self._close()
            self._place_lost()
            self._pos += 1  # the cut sample's slot
            self.dropped["truncated_sample"] += 1
            self.hit[r] = True
            return
        if cur is not None:
            self._cur_regions.append(r)
        self._touch.append(r)
        self._unplaced.append(r)

    def _place_lost(self) -> None:
        if self.lost_in is not None:
            for r in self._unplaced:
                self._pos += self.lost_in(r)
        self._unplaced = []

    def _close(self) -> Iterator[dict[str, Any]]:
        s, regions, cut = self._cur, self._cur_regions, self._cut
        self._cur, self._cur_regions, self._cut = None, [], False
        s["__pos__"] = self._pos
        self._pos += 1
        if cut:
            self._drop(regions, "truncated_sample")
        elif not regions:
            self._last = s
            yield from self._judge_queue()
            self.yielded += 1
            yield s
        elif self._last is None and self._expected is None:
            self._queue.append((s, regions))
        else:
            yield from self._judge(s, regions)

    def _judge(self, s: dict[str, Any], regions: list[int]) -> Iterator[dict[str, Any]]:
        expected = self._expected if self._last is None else self._last.keys()
        if s.keys() >= expected:
            self.yielded += 1
            yield s
        else:
            cut = any(self.regions[r].kind == "truncated" for r in regions)
            self._drop(regions, "truncated_sample" if cut else "damaged_sample")

    def _judge_queue(self) -> Iterator[dict[str, Any]]:
        if not self._queue:
            return
        if self._last is None:  # no intact sample at all: compare with every member name seen
            self._expected = frozenset().union(*(s for s, _ in self._queue))
        queue, self._queue = self._queue, []
        for s, regions in queue:
            yield from self._judge(s, regions)

    def _drop(self, regions: list[int], reason: str) -> None:
        self.dropped[reason] += 1
        for r in regions:
            self.hit[r] = True


def _plan_losses(url: str, recorded: int) -> list[int]:
    """Samples lost inside each damaged stretch, from a header-only pass and the recorded size: exact
    with one stretch; with several, spread by their byte lengths (a cut takes what is left)."""
    try:
        with _open_tar(url) as src:
            g = _Grouper(url)
            for _ in g.samples(_entries(src, want_data=False)):
                pass
            total = src.pos
    except Exception as exn:  # the main pass counts whatever went wrong
        log.debug("%s: planning pass failed: %s", url, exn)
        return []
    spans = [d.end - d.begin for d in g.regions]
    plan = [0] * len(spans)
    seen = g.yielded + sum(g.dropped.values())
    lost = recorded - seen
    if lost <= 0 or not spans:
        return plan
    per_sample = max(total - sum(spans), 1) / max(seen, 1)
    for i, d in enumerate(g.regions):
        if d.kind not in ("truncated", "empty"):
            plan[i] = min(lost, int(spans[i] / per_sample))
            lost -= plan[i]
    if lost:
        cut = [i for i, d in enumerate(g.regions) if d.kind in ("truncated", "empty")]
        plan[cut[0] if cut else max(range(len(spans)), key=spans.__getitem__)] += lost
    return plan


def _describe(d: Damage) -> str:
    return {
        "bad_header": f"bad header at byte {d.begin}, resumed at {d.end}",
        "early_end": f"zero blocks at bytes {d.begin}-{d.end} before more members",
        "bad_end": f"a damaged end-of-archive marker at byte {d.begin}",
        "truncated": f"cut at byte {d.end}" + (f" in {d.name}" if d.name else ""),
        "trailing_garbage": f"non-tar data after the end marker at bytes {d.begin}-{d.end}",
        "empty": "empty file",
    }[d.kind]


def _shard_samples(url: str, counts: Counter) -> Iterator[dict[str, Any]]:
    """One shard's samples; what was lost or skipped is added to `counts` when the shard ends."""
    recorded = recorded_size(url)
    plan: list[int] | None = None

    def lost_in(r: int) -> int:
        nonlocal plan
        if plan is None:
            plan = _plan_losses(url, recorded)
        return plan[r] if r < len(plan) else 0

    g = _Grouper(url, lost_in if recorded is not None else None)
    reasons: set[str] = set()
    left_early = False
    try:
        with _open_tar(url) as src:
            yield from g.samples(_entries(src))
        if src.error is not None:
            reasons.add(classify_exception(src.error))
            log.warning("%s: %s (%s)", url, classify_exception(src.error), str(src.error).splitlines()[0][:200])
    except GeneratorExit:  # the reader stopped inside this shard (a virtual epoch ended): nothing was lost
        left_early = True
        raise
    except Exception as exn:  # never end the epoch over one shard
        reason = classify_exception(exn)
        reasons.add(reason)
        log.warning("%s: %s (%s)", url, reason, (str(exn).splitlines() or [""])[0][:200])
    finally:
        _account(url, g, recorded, reasons, counts, complete=not left_early)


def _account(url: str, g: _Grouper, recorded: int | None, reasons: set[str], counts: Counter, complete: bool) -> None:
    """Add one shard's losses to `counts`: exact against its recorded size, else at least one per stretch."""
    if any(d.kind != "trailing_garbage" for d in g.regions):
        reasons.add("bad_tar")
    if any(d.kind == "trailing_garbage" for d in g.regions):
        reasons.add("trailing_garbage")
    if g.duplicates:
        reasons.add("duplicate_member")
    lost: Counter = Counter(g.dropped)
    if complete and recorded is not None:
        rest = recorded - g.yielded - sum(g.dropped.values())
        if rest > 0:
            lost["lost_in_damage" if g.regions or reasons else "missing_samples"] += rest
        elif rest < 0:
            log.warning("%s holds %d samples more than its recorded size %d: check sizes.json/_info.json; "
                        "sample indices after it may collide", url, -rest, recorded)
    elif complete:
        for d, hit in zip(g.regions, g.hit):
            if not hit and d.kind in ("bad_header", "early_end"):
                lost["lost_in_damage"] += 1
            elif not hit and d.kind == "truncated":
                lost["truncated_sample"] += 1
    counts.update(lost)
    counts.update(reasons)
    if complete and not reasons and not g.regions and not g.yielded and not g.dropped:
        counts["empty_shard"] += 1
    if g.regions and complete:
        n_lost = sum(lost.values())
        exact = (f"recorded size {recorded}" if recorded is not None else
                 "counted one per damaged stretch: the true number is unknown without a recorded size")
        log.warning("%s: damaged tar (%s): read %d samples, %d lost (%s)",
                    url, "; ".join(_describe(d) for d in g.regions), g.yielded, n_lost, exact)


# `__pos__` is a sample's position in its shard, lost samples counted: right after damage when the shard
# has a recorded size (with several damaged stretches in one shard their losses are spread by byte
# length, so positions between them are estimates), a lower bound without one. Read + lost = recorded.
def iter_raw_samples(urls: Iterable[str], counts: Counter) -> Iterator[dict[str, Any]]:
    """Samples as {__key__, __url__, __pos__, ext: bytes}, shard by shard. Damage never ends the epoch: samples
    lost are counted in `counts` (LOST_REASONS, exact given a recorded size), shard problems once (SHARD_REASONS)."""
    for url in urls:
        yield from _shard_samples(url, counts)


def decode_sample(raw: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] | None) -> dict[str, Any]:
    """Decoded fields of a raw sample; raises FieldError(reason) when it must be skipped.

    `required` fields must all be present; `optional` ones are decoded if present (None: every field).
    """
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    by_field: dict[str, tuple[str, bytes]] = {}
    for ext, data in members.items():
        by_field.setdefault(field_of(ext), (ext, data))
    exts = list(members)
    if not exts:
        raise FieldError("empty_sample", f"key {raw['__key__']} has no members")
    prefixes = {e.split(".", 1)[0] for e in exts}
    if len(exts) > 1 and len(prefixes) == 1 and all("." in e for e in exts):
        # `a.b.jpg` + `a.b.cls` group as key `a` with members `b.jpg`, `b.cls`: the key had a dot
        raise FieldError("dotted_key", f"key {raw['__key__']}.{prefixes.pop()} contains a dot; rename the sample")
    missing = [f for f in required if f not in by_field]
    if missing:
        raise FieldError(f"missing_{missing[0]}", f"key {raw['__key__']} has {sorted(exts)}")
    wanted = set(required) | (set(by_field) if optional is None else set(optional) & set(by_field))
    out: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw.get("__url__")}
    for field in sorted(wanted, key=lambda f: (f not in required, f)):
        ext, data = by_field[field]
        out[field] = decode_field(field, ext, data)
    return out


def count_samples(urls: list[str]) -> int:
    """Sample count by scanning the tars (distinct consecutive keys), for shards without metadata."""
    total = 0
    for u in urls:
        for _ in iter_raw_samples([u], Counter()):
            total += 1
    return total


def dataset_size(pattern: str | list[str], scan: bool = False) -> int | None:
    """Samples in the shards: from metadata, else by a scan when `scan=True`, else None."""
    urls = [u for source in expand_sources(pattern) for u in source]
    size = known_size(urls)
    if size is None and scan:
        size = count_samples(urls)
    return size


# -- checking ------------------------------------------------------------------------------------
def check_shards(pattern: str) -> list[dict[str, Any]]:
    """Per shard, decoding every field: `samples` good, `read` (good + undecodable), `lost`, `recorded` size,
    `mismatch` (read + lost != recorded), `skipped` by reason and `fields` seen."""
    rows = []
    urls = [u for source in expand_sources(pattern) for u in source]
    for url in progress(urls, desc="checking", unit="shard"):
        counts: Counter = Counter()
        fields: Counter = Counter()
        good = read = 0
        for raw in iter_raw_samples([url], counts):
            read += 1
            try:
                sample = decode_sample(raw, required=(), optional=None)
            except FieldError as e:
                counts[e.reason] += 1
                continue
            if not any(not k.startswith("__") for k in sample):
                counts["empty_sample"] += 1
                continue
            good += 1
            fields.update(k for k in sample if not k.startswith("__"))
        recorded = recorded_size(url)
        lost = sum(counts[r] for r in LOST_REASONS)
        rows.append({
            "shard": url, "samples": good, "read": read, "lost": lost, "recorded": recorded,
            "mismatch": recorded is not None and read + lost != recorded,
            "fields": dict(sorted(fields.items())), "skipped": {r: n for r, n in counts.items() if n},
        })
    return rows
