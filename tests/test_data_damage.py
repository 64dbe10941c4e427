"""Damaged shards: nothing raises, what follows the damage is read, and read + lost = recorded size."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from zoo.data import loader
from zoo.data.reader import LOST_REASONS, check_shards, counts_samples, iter_raw_samples
from zoo.data.writer import write_shards

N = 24  # samples in the shard, 3 members each: jpg, cls, txt


def toy(n: int):
    for i in range(n):
        yield {"__key__": f"{i:09d}", "image": Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)), "label": i,
               "caption": f"sample {i}"}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[bytes, dict[str, tuple[int, int, int]]]:
    """The bytes of one intact shard of N samples and {member name: (header offset, data offset, size)}."""
    out = tmp_path_factory.mktemp("intact")
    write_shards(toy(N), out, maxcount=N)
    with tarfile.open(out / "00000.tar") as t:
        members = {m.name: (m.offset, m.offset_data, m.size) for m in t.getmembers()}
    return (out / "00000.tar").read_bytes(), members


def header(members, i: int, ext: str) -> int:
    return members[f"{i:09d}.{ext}"][0]


def write_damaged(folder: Path, blob: bytes, recorded: bool = True) -> str:
    folder.mkdir(parents=True)
    (folder / "00000.tar").write_bytes(blob)
    if recorded:
        (folder / "sizes.json").write_text(json.dumps({"00000.tar": N}))
    return str(folder / "00000.tar")


def read_all(url: str) -> tuple[list[dict], Counter]:
    counts: Counter = Counter()
    return list(iter_raw_samples([url], counts)), counts


def lost(counts: Counter) -> int:
    return sum(counts[r] for r in LOST_REASONS)


def assert_accounted(url: str) -> dict:
    """read + lost = N through check_shards and through the real loader; returns check_shards' row."""
    (row,) = check_shards(url)
    assert row["recorded"] == N and not row["mismatch"]
    assert row["read"] + row["lost"] == N, row
    ld = loader(url, fields=("image", "label"), batch_size=None, shuffle=0)
    got = list(ld)
    skipped_samples = sum(n for r, n in ld.skipped.items() if counts_samples(r))
    assert len(got) + skipped_samples == N, (len(got), ld.skipped)
    assert len({s["__key__"] for s in got}) == len(got)  # a sample split by damage is not read twice
    return row


def zeros(blob: bytes, start: int, length: int) -> bytes:
    return blob[:start] + bytes(length) + blob[start + length :]


def flip(blob: bytes, at: int, value: int | None = None) -> bytes:
    b = bytearray(blob)
    b[at] = (b[at] ^ 0x01) if value is None else value
    return bytes(b)


# -- each kind of damage -------------------------------------------------------------------------
def test_zeroed_samples_mid_file_are_counted_and_the_rest_recovered(shard, tmp_path):
    blob, m = shard
    start, end = header(m, 8, "jpg"), header(m, 11, "jpg")  # samples 8, 9, 10 zeroed: reads as an end marker
    url = write_damaged(tmp_path / "d", zeros(blob, start, end - start))
    samples, counts = read_all(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N) if not 8 <= i <= 10]
    assert counts == Counter(lost_in_damage=3, bad_tar=1)
    assert all(s["__pos__"] == int(s["__key__"]) for s in samples)  # positions after the damage stay right
    row = assert_accounted(url)
    assert row["lost"] == 3 and row["samples"] == N - 3
    ld = loader(url, fields=("image", "label"), batch_size=None, shuffle=0, index=True)
    assert [s["__index__"] for s in ld] == [int(s["__key__"]) for s in samples]


def test_unaligned_zeros_drop_only_the_samples_they_touch(shard, tmp_path):
    blob, m = shard
    url = write_damaged(tmp_path / "d", zeros(blob, header(m, 8, "cls") + 100, 1500))  # into 8.cls's header
    samples, counts = read_all(url)
    keys = {s["__key__"] for s in samples}
    assert "000000008" not in keys and {f"{i:09d}" for i in range(9, N)} <= keys
    assert lost(counts) == N - len(samples) and counts["bad_tar"] == 1
    assert_accounted(url)


@pytest.mark.parametrize("where", ["first_member", "mid_header", "header_boundary", "half", "in_padding"])
def test_truncation(shard, tmp_path, where):
    blob, m = shard
    cut = {"first_member": 700, "mid_header": header(m, 5, "cls") + 3, "header_boundary": header(m, 9, "txt"),
           "half": len(blob) // 2, "in_padding": len(blob) - 1024}[where]
    url = write_damaged(tmp_path / "d", blob[:cut])
    samples, counts = read_all(url)
    assert len(samples) + lost(counts) == N
    if where == "in_padding":  # only zero padding went: nothing lost
        assert len(samples) == N and not counts
    else:
        assert counts["bad_tar"] == 1 and counts["truncated_sample"] <= 1 and lost(counts) >= 1
        assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]
    assert_accounted(url)


@pytest.mark.parametrize("field,offset", [("size", 124 + 9), ("checksum", 148 + 3), ("mtime", 136 + 5), ("name", 4)])
def test_a_flipped_byte_in_a_header_loses_one_sample(shard, tmp_path, field, offset):
    blob, m = shard
    url = write_damaged(tmp_path / "d", flip(blob, header(m, 12, "cls") + offset))
    samples, counts = read_all(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N) if i != 12]
    assert counts == Counter(damaged_sample=1, bad_tar=1)
    assert all(s["__pos__"] == int(s["__key__"]) for s in samples)
    assert_accounted(url)


def test_non_octal_header_field_does_not_raise(shard, tmp_path):
    blob, m = shard
    url = write_damaged(tmp_path / "d", flip(blob, header(m, 3, "jpg") + 126, ord("9")))  # int('...9...', 8) fails
    samples, counts = read_all(url)
    assert len(samples) == N - 1 and counts["damaged_sample"] == 1
    assert_accounted(url)


def test_flipped_bytes_in_member_data_are_decode_skips_not_tar_losses(shard, tmp_path):
    blob, m = shard
    _, data_at, _ = m["000000006.cls"]
    url = write_damaged(tmp_path / "d", flip(blob, data_at, ord("x")))  # label "6" -> "x"
    samples, counts = read_all(url)
    assert len(samples) == N and not counts
    row = assert_accounted(url)
    assert row["skipped"] == {"bad_label": 1} and row["lost"] == 0


def test_bad_header_in_the_middle(shard, tmp_path):
    blob, m = shard
    at = header(m, 15, "jpg")
    url = write_damaged(tmp_path / "d", blob[:at] + b"not a tar header" * 32 + blob[at + 512 :])
    samples, counts = read_all(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N) if i != 15]
    assert counts == Counter(damaged_sample=1, bad_tar=1)
    assert_accounted(url)


@pytest.mark.parametrize("span", ["first_header", "first_sample"])
def test_damage_at_the_start(shard, tmp_path, span):
    """Before any intact sample: the damaged one waits for an intact neighbour to be judged against."""
    blob, m = shard
    end = 512 if span == "first_header" else header(m, 1, "jpg")
    url = write_damaged(tmp_path / "d", b"\x07" * end + blob[end:])
    samples, counts = read_all(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(1, N)]
    assert counts == Counter({"damaged_sample" if span == "first_header" else "lost_in_damage": 1, "bad_tar": 1})
    assert all(s["__pos__"] == int(s["__key__"]) for s in samples)
    assert_accounted(url)


def test_random_damage_never_raises_and_adds_up(shard, tmp_path):
    blob, _ = shard
    rng = np.random.default_rng(7)
    folder = tmp_path / "d"
    write_damaged(folder, blob)
    for _ in range(120):
        b = bytearray(blob)
        for _ in range(rng.integers(1, 4)):
            at, n = int(rng.integers(len(b))), int(rng.integers(1, 3000))
            kind = rng.choice(["zero", "flip", "cut", "garbage", "insert"])
            if kind == "zero":
                b[at : at + n] = bytes(len(b[at : at + n]))
            elif kind == "flip":
                b[at] ^= 1 << int(rng.integers(8))
            elif kind == "cut":
                del b[at:]
            elif kind == "garbage":
                b[at : at + n] = rng.integers(0, 256, len(b[at : at + n]), dtype=np.uint8).tobytes()
            else:
                b[at:at] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        (folder / "00000.tar").write_bytes(bytes(b))
        samples, counts = read_all(str(folder / "00000.tar"))
        keys = [s["__key__"] for s in samples]
        assert len(samples) + lost(counts) == N and len(set(keys)) == len(keys), (kind, counts)


def test_trailing_garbage_after_the_end_marker(shard, tmp_path):
    blob, _ = shard
    url = write_damaged(tmp_path / "d", blob + b"garbage" * 200)
    samples, counts = read_all(url)
    assert len(samples) == N and counts == Counter(trailing_garbage=1)
    row = assert_accounted(url)
    assert row["lost"] == 0 and row["skipped"] == {"trailing_garbage": 1}


@pytest.mark.parametrize("recorded", [True, False])
def test_damaged_end_marker_loses_nothing(shard, tmp_path, recorded):
    blob, m = shard
    _, data_at, size = m[f"{N - 1:09d}.txt"]
    end_marker = data_at + -(-size // 512) * 512
    url = write_damaged(tmp_path / "d", flip(blob, end_marker + 7), recorded=recorded)
    samples, counts = read_all(url)
    assert len(samples) == N and counts == Counter(bad_tar=1)


def test_empty_file(tmp_path):
    url = write_damaged(tmp_path / "d", b"")
    samples, counts = read_all(url)
    assert samples == [] and counts == Counter(lost_in_damage=N, bad_tar=1)
    assert_accounted(url)


def test_two_damaged_stretches_and_an_intact_tail(shard, tmp_path):
    blob, m = shard
    blob = zeros(blob, header(m, 3, "jpg"), header(m, 5, "jpg") - header(m, 3, "jpg"))  # samples 3, 4
    blob = flip(blob, header(m, 17, "txt") + 150)                                       # 17 loses its caption
    url = write_damaged(tmp_path / "d", blob)
    samples, counts = read_all(url)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N) if i not in (3, 4, 17)]
    assert counts == Counter(lost_in_damage=2, damaged_sample=1, bad_tar=1)
    assert_accounted(url)


# -- without a recorded size ---------------------------------------------------------------------
def test_without_recorded_size_at_least_one_per_stretch_and_said_so(shard, tmp_path, caplog):
    blob, m = shard
    start, end = header(m, 8, "jpg"), header(m, 11, "jpg")
    url = write_damaged(tmp_path / "d", zeros(blob, start, end - start), recorded=False)
    with caplog.at_level(logging.WARNING, logger="zoo.data.reader"):
        samples, counts = read_all(url)
    assert len(samples) == N - 3 and counts == Counter(lost_in_damage=1, bad_tar=1)
    assert "unknown without a recorded size" in caplog.text
    (row,) = check_shards(url)
    assert row["recorded"] is None and row["lost"] == 1 and not row["mismatch"]


def test_intact_looking_shard_shorter_than_recorded(shard, tmp_path):
    """Zeros over the last samples up to the end look like a clean end: only the recorded size tells."""
    blob, m = shard
    start = header(m, 20, "jpg")
    url = write_damaged(tmp_path / "d", zeros(blob, start, len(blob) - start))
    samples, counts = read_all(url)
    assert len(samples) == 20 and counts == Counter(missing_samples=4)
    assert_accounted(url)


# -- other readers of the same bytes -------------------------------------------------------------
def test_stream_path_counts_damage_too(shard, tmp_path):
    """Remote URLs (here `pipe:`) and compressed shards go through the same resynchronising reader."""
    blob, m = shard
    start, end = header(m, 8, "jpg"), header(m, 11, "jpg")
    damaged = zeros(blob, start, end - start)
    url = write_damaged(tmp_path / "d", damaged, recorded=False)
    samples, counts = read_all(f"pipe:cat {url}")
    assert len(samples) == N - 3 and counts == Counter(lost_in_damage=1, bad_tar=1)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar.gz").write_bytes(gzip.compress(blob))
    samples, counts = read_all(str(tmp_path / "gz" / "00000.tar.gz"))
    assert len(samples) == N and not counts
    packed = gzip.compress(blob)
    (tmp_path / "gz" / "00001.tar.gz").write_bytes(packed[: len(packed) // 2])  # a cut gzip stream
    samples, counts = read_all(str(tmp_path / "gz" / "00001.tar.gz"))
    assert 0 < len(samples) < N and counts["bad_tar"] == 1 and lost(counts) >= 1


def test_intact_shards_read_as_webdataset_reads_them(tmp_path):
    """The fast path: same samples and bytes as webdataset's reader, pax long names included."""
    long = "d" * 120
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("a0", f"{long}/b1", "ünï2"):
            for ext, data in (("jpg", key.encode() * 300), ("cls", b"1"), ("__index__", b"x")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    url = str(tmp_path / "00000.tar")
    ours, counts = read_all(url)
    theirs = list(wds.WebDataset(url, shardshuffle=False))
    assert not counts
    assert [{k: v for k, v in s.items() if k != "__pos__"} for s in ours] == \
        [{k: v for k, v in s.items() if k != "__local_path__"} for s in theirs]


def test_stopping_inside_a_damaged_shard_counts_no_unread_samples(shard, tmp_path):
    blob, m = shard
    url = write_damaged(tmp_path / "d", blob[: len(blob) // 2])
    counts: Counter = Counter()
    it = iter_raw_samples([url], counts)
    next(it)
    it.close()  # a virtual epoch ended here
    assert lost(counts) == 0
