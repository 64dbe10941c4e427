"""The webdataset loader: interop, sizes, exact skip counts, rank x worker splits, resampling."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from zoo.data import loader
from zoo.data.shards import DataError, check_shards, dataset_size, write_shards


def img(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def pixel(sample) -> int:
    return int(np.asarray(sample["image"])[0, 0, 0])


def toy(n: int, start: int = 0):
    """Samples whose image value (a multiple of 2 below 256) and label identify them."""
    for i in range(start, start + n):
        yield {"__key__": f"{i:09d}", "image": img(i % 128 * 2), "label": i, "caption": f"sample {i}"}


def keys_of(ld) -> list[str]:
    return [k for batch in ld for k in batch["__key__"]]


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    img(value).save(buf, format="JPEG")
    return buf.getvalue()


# -- interop -------------------------------------------------------------------------------------
def test_reads_shards_written_by_plain_webdataset(tmp_path):
    with wds.TarWriter(str(tmp_path / "plain-000.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"s{i:04d}", "jpg": np.full((8, 8, 3), i * 10, dtype=np.uint8), "cls": i % 4, "txt": f"t{i}"})
    ld = loader(str(tmp_path / "plain-000.tar"), fields=("image", "label", "caption"), batch_size=None, shuffle=0)
    samples = list(ld)
    assert [s["label"] for s in samples] == [i % 4 for i in range(12)]
    assert [s["caption"] for s in samples] == [f"t{i}" for i in range(12)]
    assert [abs(pixel(s) - i * 10) <= 2 for i, s in enumerate(samples)] == [True] * 12  # jpeg
    assert not ld.skipped


def test_reads_img2dataset_layout_and_stats(tmp_path):
    """img2dataset: %05d.tar, 9-digit keys, jpg/txt/json members, NNNNN_stats.json with successes."""
    for shard in range(2):
        members = []
        for j in range(5):
            key = f"{shard:05d}{j:04d}"
            meta = {"url": f"http://x/{key}.jpg", "caption": f"c{key}", "key": key, "status": "success", "width": 8}
            members += [(f"{key}.jpg", jpeg(j * 40)), (f"{key}.txt", f"c{key}".encode()),
                        (f"{key}.json", json.dumps(meta, indent=4).encode())]
        raw_tar(tmp_path / f"{shard:05d}.tar", members)
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 6, "successes": 5, "failed_to_download": 1}))
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert dataset_size(pattern) == 10
    ld = loader(pattern, fields=("image", "caption"), optional_fields=("meta",), batch_size=None, shuffle=0)
    samples = list(ld)
    assert len(samples) == 10 == len(ld)
    assert samples[6]["__key__"] == "000010001" and samples[6]["caption"] == "c000010001"
    assert samples[6]["meta"]["status"] == "success"


def test_our_shards_read_by_plain_webdataset(tmp_path):
    write_shards(toy(25), tmp_path, maxcount=10)
    ds = wds.WebDataset(str(tmp_path / "{00000..00002}.tar"), shardshuffle=False).decode("pil")
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(25)]
    assert [s["cls"] for s in samples] == list(range(25))
    assert samples[3]["txt"] == "sample 3"
    assert abs(int(np.asarray(samples[3]["jpg"])[0, 0, 0]) - 6) <= 2
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}


def test_written_modalities_round_trip(tmp_path):
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5
    sample = {"__key__": "000000000", "image": img(10), "label": 2, "mask": mask, "thermal": img(3).convert("L"),
              "meta": {"captions": {"short": "x"}}, "emb": np.arange(4, dtype=np.float32)}
    write_shards([sample], tmp_path)
    with tarfile.open(tmp_path / "00000.tar") as t:
        names = sorted(t.getnames())
    assert names == sorted(["000000000.jpg", "000000000.cls", "000000000.seg.png", "000000000.thermal.png",
                            "000000000.json", "000000000.emb.npy"])
    (got,) = list(loader(str(tmp_path / "00000.tar"), fields=("image",), optional_fields=None, batch_size=None))
    assert np.array_equal(got["mask"], mask)
    assert got["thermal"].mode == "L" and got["meta"] == {"captions": {"short": "x"}}
    assert np.array_equal(got["emb"], np.arange(4, dtype=np.float32))


# -- sizes ---------------------------------------------------------------------------------------
def test_size_from_info_json_and_scan(tmp_path):
    write_shards(toy(7), tmp_path, maxcount=4)
    (tmp_path / "sizes.json").unlink()
    pattern = str(tmp_path / "*.tar")
    assert dataset_size(pattern) is None
    assert dataset_size(pattern, scan=True) == 7
    (tmp_path / "_info.json").write_text(json.dumps(
        {"name": "toy", "splits": {"train": {"num_samples": 7, "shard_lengths": [4, 3], "filenames": ["00000.tar", "00001.tar"]}}}))
    assert dataset_size(pattern) == 7
    assert dataset_size(str(tmp_path / "00001.tar")) == 3


# -- bad input: every skip counted by reason -----------------------------------------------------
def test_fault_shards_exact_skip_counts(tmp_path):
    good = [(f"{i:09d}.jpg", jpeg(i)) for i in range(3)] + [(f"{i:09d}.cls", str(i).encode()) for i in range(3)]
    good = sorted(good)
    members = good + [
        ("000000010.jpg", b"this is not a jpeg"), ("000000010.cls", b"1"),        # undecodable image
        ("000000011.jpg", jpeg(5)),                                               # missing cls
        ("000000012.jpg", jpeg(5)), ("000000012.cls", b"cat"),                    # bad label
        ("000000013.jpg", jpeg(5)), ("000000013.cls", b"1"), ("000000013.txt", b"\xff\xfe bad"),  # non-UTF-8 text
        ("a.b.jpg", jpeg(5)), ("a.b.cls", b"1"),                                  # key with a dot
    ]
    raw_tar(tmp_path / "00000.tar", members)
    raw_tar(tmp_path / "00001.tar", [])                                           # an empty shard
    write_shards(toy(6, start=100), tmp_path / "t", maxcount=6)
    data = (tmp_path / "t" / "00000.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2])                 # a truncated tar
    ld = loader(str(tmp_path / "{00000..00002}.tar"), fields=("image", "label"), optional_fields=("caption",),
                batch_size=None, shuffle=0, num_workers=2)
    samples = list(ld)
    truncated_good = [s for s in samples if s["__url__"].endswith("00002.tar")]
    assert {s["__key__"] for s in samples} - {s["__key__"] for s in truncated_good} == {f"{i:09d}" for i in range(3)}
    assert 0 < len(truncated_good) < 6
    assert ld.skipped == Counter(
        undecodable_image=1, missing_label=1, bad_label=1, bad_text=1, dotted_key=1,
        empty_shard=1, bad_tar=1, truncated_sample=1,
    )
    rows = {Path(r["shard"]).name: r for r in check_shards(str(tmp_path / "*.tar"))}
    assert rows["00000.tar"]["samples"] == 4  # the label-less sample is fine when nothing is required
    assert rows["00000.tar"]["skipped"] == {"undecodable_image": 1, "bad_label": 1, "bad_text": 1, "dotted_key": 1}
    assert rows["00001.tar"]["skipped"] == {"empty_shard": 1}
    assert rows["00002.tar"]["skipped"] == {"bad_tar": 1, "truncated_sample": 1}


def test_missing_path_and_pattern_fail_fast(tmp_path):
    with pytest.raises(DataError, match="shard not found"):
        loader(str(tmp_path / "train-{000..003}.tar"))
    with pytest.raises(DataError, match="no shard matches"):
        loader(str(tmp_path / "*.tar"))


def test_fewer_shards_than_workers_times_ranks_is_an_error(tmp_path):
    write_shards(toy(6), tmp_path, maxcount=2)  # 3 shards
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        loader(str(tmp_path / "*.tar"), num_workers=2, rank=0, world_size=2)
    loader(str(tmp_path / "*.tar"), num_workers=2, resampled=True, epoch_samples=10, rank=0, world_size=2)


# -- splitting and determinism -------------------------------------------------------------------
def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    write_shards(toy(80), tmp_path, maxcount=10)  # 8 shards
    pattern = str(tmp_path / "*.tar")
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            ld = loader(pattern, fields=("image", "label"), batch_size=4, num_workers=2, shuffle=16, seed=5,
                        rank=rank, world_size=2, transform=lambda s: {"__key__": s["__key__"], "label": s["label"]})
            ld.set_epoch(epoch)
            per_rank.append(keys_of(ld))
        assert not set(per_rank[0]) & set(per_rank[1])
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == [f"{i:09d}" for i in range(80)]
        assert len(per_rank[0]) == len(per_rank[1]) == 40


def test_same_seed_same_order_new_epoch_new_order(tmp_path):
    write_shards(toy(60), tmp_path, maxcount=10)
    pattern = str(tmp_path / "*.tar")

    def run(seed, epochs=1):
        ld = loader(pattern, batch_size=8, num_workers=2, shuffle=20, seed=seed,
                    transform=lambda s: {"__key__": s["__key__"]})
        return [keys_of(ld) for _ in range(epochs)]

    a, b = run(1, epochs=2), run(1, epochs=2)
    assert a == b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])
    assert run(2)[0] != a[0]


def test_transform_randomness_is_seeded_and_leaves_training_rng_alone(tmp_path):
    write_shards(toy(20), tmp_path, maxcount=10)

    def noisy(s):
        return {"noise": torch.rand(1)}

    def run():
        ld = loader(str(tmp_path / "*.tar"), transform=noisy, batch_size=5, seed=9, num_workers=0)
        return torch.cat([b["noise"] for b in ld])

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), before), "the loader consumed the training RNG"
    assert torch.equal(run(), first)
    assert first.unique().numel() == 20


# -- resampled mode ------------------------------------------------------------------------------
def test_resampled_virtual_epoch_and_source_weights(tmp_path):
    write_shards(toy(40), tmp_path / "a", maxcount=10)
    write_shards(toy(40, start=1000), tmp_path / "b", maxcount=10)
    pattern = f"{tmp_path}/a/*.tar::{tmp_path}/b/*.tar"
    ld = loader(pattern, fields=("label",), batch_size=10, resampled=True, epoch_samples=30, num_workers=2,
                transform=lambda s: {"label": s["label"]})
    labels = torch.cat([b["label"] for b in ld])
    assert len(labels) == 30 and len(ld) == 3
    ld = loader(pattern, fields=("label",), batch_size=50, resampled=True, epoch_samples=600, weights="3::1",
                shuffle=0, seed=4, transform=lambda s: {"label": s["label"]})
    labels = torch.cat([b["label"] for b in ld])
    share_a = (labels < 1000).float().mean().item()
    assert 0.68 < share_a < 0.82, share_a
    with pytest.raises(DataError, match="resampled=True"):
        loader(pattern, weights=[1, 1])
    with pytest.raises(DataError, match="one weight per source"):
        loader(pattern, weights=[1], resampled=True, epoch_samples=10)


def test_len_and_drop_last(tmp_path):
    write_shards(toy(23), tmp_path, maxcount=10)
    ld = loader(str(tmp_path / "*.tar"), fields=("label",), batch_size=5, drop_last=True,
                transform=lambda s: {"label": s["label"]})
    assert len(ld) == 4
    assert sum(len(b["label"]) for b in ld) == 20
    assert ld.skipped == Counter(dropped_last_batch=3)


def test_png_bytes_in_a_jpg_member_still_decode(tmp_path):
    buf = io.BytesIO()
    img(42).save(buf, format="PNG")
    raw_tar(tmp_path / "00000.tar", [("000000000.jpg", buf.getvalue()), ("000000000.cls", b"3")])
    (s,) = list(loader(str(tmp_path / "00000.tar"), fields=("image", "label"), batch_size=None))
    assert pixel(s) == 42 and s["label"] == 3
