"""The webdataset loader: interop, sizes, exact skip counts, rank x worker splits, resampling."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from zoo.recipes.base import DataSpec, Method

from zoo.data import loader
from zoo.data.reader import check_shards, dataset_size
from zoo.data.writer import write_shards
from zoo.errors import DataError
from zoo.registry import RECIPES


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
    (tmp_path / "_info.json").unlink()
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

    def run(transform=noisy, collate=None):
        ld = loader(str(tmp_path / "*.tar"), transform=transform, collate=collate, batch_size=5, seed=9, num_workers=0)
        return torch.cat([b["noise"] for b in ld])

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), before), "the loader consumed the training RNG"
    assert torch.equal(run(), first)
    assert first.unique().numel() == 20
    # a collate draws from numpy's and random's global streams too (timm's Mixup does): seeded, and left alone
    import random

    np.random.seed(5), random.seed(5)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    draws = lambda batch: {"noise": torch.tensor([[np.random.rand(), random.random()] for _ in batch])}  # noqa: E731
    a = run(lambda s: s, draws)
    assert (np.random.get_state()[1] == np_before).all() and random.getstate() == py_before
    assert torch.equal(run(lambda s: s, draws), a) and a.unique().numel() == 40


def _draws(s):
    """Every random generator a transform may use, and the worker it ran in."""
    import os
    import random

    return {"__key__": s["__key__"], "draw": torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(1))]),
            "pid": os.getpid()}


def test_workers_persist_and_each_epoch_is_what_a_fresh_loader_gives(tmp_path):
    write_shards(toy(40), tmp_path, maxcount=10)
    pattern = str(tmp_path / "*.tar")

    def make():
        return loader(pattern, batch_size=4, num_workers=2, shuffle=8, seed=3, transform=_draws)

    def epoch(ld):
        batches = list(ld)
        return ([k for b in batches for k in b["__key__"]], torch.cat([b["draw"] for b in batches]),
                {int(p) for b in batches for p in b["pid"]})

    ld = make()
    keys0, draws0, pids0 = epoch(ld)
    keys1, draws1, pids1 = epoch(ld)
    assert len(pids0) == 2 and pids1 == pids0, "the workers were started again for the second epoch"
    assert keys1 != keys0 and sorted(keys1) == sorted(keys0)
    # a fresh loader set to epoch 1 (a resumed run) sees exactly what the persistent workers gave
    resumed = make()
    resumed.set_epoch(1)
    keys_r, draws_r, pids_r = epoch(resumed)
    assert keys_r == keys1 and torch.equal(draws_r, draws1) and not pids_r & pids0
    assert not torch.equal(draws1, draws0)


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


# -- batches span the workers: every sample used -------------------------------------------------
def keyed(s):
    return {"__key__": s["__key__"], "label": s["label"]}


def batches_of(pattern, **kw):
    """(the keys of each batch, the loader)"""
    ld = loader(pattern, fields=("label",), transform=keyed, batch_size=128, shuffle=50, seed=3, **kw)
    out = [list(b["__key__"]) for b in ld]
    return out, ld


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_small_dataset_loses_at_most_one_partial_batch(tmp_path, workers):
    """300 samples in 3 shards, batch 128: 2 full batches with drop_last, 3 (the last short) without."""
    write_shards(({"__key__": f"{i:09d}", "label": i} for i in range(300)), tmp_path, maxcount=100)
    pattern = str(tmp_path / "*.tar")
    kept, ld = batches_of(pattern, num_workers=workers, drop_last=True)
    assert [len(b) for b in kept] == [128, 128] and len(ld) == 2
    keys = [k for b in kept for k in b]
    assert len(set(keys)) == 256
    assert ld.skipped == Counter(dropped_last_batch=44) and ld.samples_seen == 256
    everything, ld = batches_of(pattern, num_workers=workers, drop_last=False)
    assert [len(b) for b in everything] == [128, 128, 44] and len(ld) == 3
    assert sorted(k for b in everything for k in b) == [f"{i:09d}" for i in range(300)]
    assert not ld.skipped and ld.samples_seen == 300
    assert batches_of(pattern, num_workers=workers, drop_last=False)[0] == everything  # the same batches, in order
    assert everything[:2] == kept


def test_two_ranks_each_merge_their_workers_leftovers(tmp_path):
    write_shards(({"__key__": f"{i:09d}", "label": i} for i in range(300)), tmp_path, maxcount=50)  # 6 shards
    pattern = str(tmp_path / "*.tar")
    strategy = torch.multiprocessing.get_sharing_strategy()
    for drop_last, sizes in ((True, [128]), (False, [128, 22])):
        ranks = [batches_of(pattern, num_workers=2, drop_last=drop_last, rank=r, world_size=2) for r in (0, 1)]
        keys = [[k for b in batches for k in b] for batches, _ in ranks]
        assert [[len(b) for b in batches] for batches, _ in ranks] == [sizes, sizes]
        assert [len(ld) for _, ld in ranks] == [len(sizes)] * 2
        assert not set(keys[0]) & set(keys[1])
        if not drop_last:
            assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(300)]
        again = [batches_of(pattern, num_workers=2, drop_last=drop_last, rank=r, world_size=2)[0] for r in (0, 1)]
        assert again == [batches for batches, _ in ranks]
    assert torch.multiprocessing.get_sharing_strategy() == strategy  # the workers' choice, not the main process's


def test_collate_randomness_of_merged_batches_is_seeded_and_leaves_training_rng_alone(tmp_path):
    """Collates may draw randomness (iBOT block masks): the merged batches' draws are seeded too."""
    write_shards(toy(30), tmp_path, maxcount=10)

    def masked(batch):
        return {"label": torch.tensor([s["label"] for s in batch]), "mask": torch.rand(len(batch))}

    def run():
        ld = loader(str(tmp_path / "*.tar"), fields=("label",), transform=lambda s: {"label": s["label"]},
                    collate=masked, batch_size=8, num_workers=2, seed=2)
        return [(b["label"].tolist(), b["mask"]) for b in ld]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = run()
    assert torch.equal(torch.get_rng_state(), before), "merging leftovers consumed the training RNG"
    assert [len(labels) for labels, _ in first] == [8, 8, 8, 6]  # workers hold 20 + 10: 2 + 1 full, then 4 + 2 left
    second = run()
    assert [labels for labels, _ in first] == [labels for labels, _ in second]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))
    assert torch.cat([m for _, m in first]).unique().numel() == 30


def test_resampled_quota_batches_span_workers(tmp_path):
    write_shards(toy(40), tmp_path, maxcount=10)
    ld = loader(str(tmp_path / "*.tar"), fields=("label",), batch_size=10, resampled=True, epoch_samples=30,
                num_workers=2, transform=lambda s: {"label": s["label"]})
    assert [len(b["label"]) for b in ld] == [10, 10, 10] == [10] * len(ld)  # 15 per worker: 5 + 5 merged


# -- no transform --------------------------------------------------------------------------------
def test_no_transform_batches_images_as_uint8_tensors(tmp_path):
    write_shards(toy(6), tmp_path, image_format="png")
    (batch,) = list(loader(str(tmp_path / "*.tar"), fields=("image", "label", "caption"), batch_size=6, shuffle=0))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, 8, 8)
    assert batch["image"][:, :, 3, 5].tolist() == [[i * 2] * 3 for i in range(6)]
    assert batch["label"].tolist() == list(range(6))
    assert batch["caption"] == [f"sample {i}" for i in range(6)]


def test_images_of_several_sizes_without_transform_is_a_data_error(tmp_path):
    samples = [{"__key__": f"{i:09d}", "image": img(i, size=8 if i % 2 else 12)} for i in range(4)]
    write_shards(samples, tmp_path, image_format="png")
    for workers in (0, 1):
        with pytest.raises(DataError, match=r"\(3, 12, 12\) and \(3, 8, 8\).*pass a transform.*eval_transform") as e:
            list(loader(str(tmp_path / "*.tar"), batch_size=4, shuffle=0, num_workers=workers))
        assert "\n" not in str(e.value)  # the worker's error arrives as itself, not wrapped in a traceback


class ShortBatchStub(Method):
    """The smallest trainable method; it logs each batch's size, and keeps short batches when asked."""

    def __init__(self, arch: str = "none", keep_short: bool = False):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)
        self.net.pretrained_cfg = {"input_size": (3, 8, 8)}
        self.keep_short = keep_short

    def training_step(self, batch, step):
        return {"loss": self.net(batch["x"]).pow(2).mean(), "n": torch.tensor(float(len(batch["x"])))}

    def data_spec(self) -> DataSpec:
        return DataSpec(fields=("label",), transform=lambda s: {"x": torch.tensor([float(s["label"])])},
                        drop_last=not self.keep_short)

    def backbone(self) -> torch.nn.Module:
        return self.net


@pytest.mark.parametrize("keep_short", [False, True])
def test_data_spec_drop_last_reaches_the_trainer(tmp_path, keep_short):
    from zoo.engine.trainer import pretrain

    write_shards(({"__key__": f"{i:09d}", "label": i} for i in range(10)), tmp_path / "s", maxcount=5)
    name = f"zoo_test_short_batch_{uuid.uuid4().hex[:8]}"
    RECIPES.register(name, ShortBatchStub)
    try:
        res = pretrain({
            "method": {"name": name, "keep_short": keep_short}, "model": {"arch": "vit_nano_patch4_32"},
            "data": {"train": str(tmp_path / "s" / "*.tar"), "batch_size": 4, "num_workers": 0, "shuffle": 0},
            "optim": {"lr": 1e-3}, "schedule": {"steps": 4, "warmup_steps": 1},
            "output": {"checkpoint_every": 0, "log_every": 1, "tensorboard": False, "plots": False}, "seed": 1,
        }, run_dir=tmp_path / "run")
    finally:
        RECIPES._entries.pop(name, None)
    sizes = [m["n"] for m in res.metrics]
    assert sizes == ([4, 4, 2, 4] if keep_short else [4, 4, 4, 4])  # 10 samples an epoch, batch 4
    assert "dropped_by_collate" not in res.skipped  # a kept short batch is not a collate's drop


# -- per-batch tail of the transform ---------------------------------------------------------------
def _scene_shards(tmp_path, n=23):
    from zoo.data.builtin import generate

    samples = ({"__key__": f"{i:09d}", "image": s["image"], "label": s["label"]}
               for i, s in enumerate(generate("scenes", n, size=24, seed=0)))
    write_shards(samples, tmp_path, maxcount=6)
    return str(tmp_path / "*.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_sample_transform_tail_runs_per_batch_and_gives_the_same_batches(tmp_path, workers):
    from torchvision.transforms import v2
    from zoo.data.transforms import SampleTransform, train_transform

    pattern = _scene_shards(tmp_path)
    bench = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(16, scale=(0.35, 1.0), antialias=True),
                        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    zoo_t = train_transform({"input_size": (3, 16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)})
    for t in (bench, zoo_t):
        split = SampleTransform(image=t)
        whole = lambda s, t=t: {**s, "image": t(s["image"])}  # noqa: E731  (a plain function: never split)
        kw = dict(fields=("image", "label"), batch_size=5, num_workers=workers, seed=3)
        a, b = list(loader(pattern, transform=split, **kw)), list(loader(pattern, transform=whole, **kw))
        assert [len(x["label"]) for x in a] == [5, 5, 5, 5, 3]  # the leftover batch goes through the tail too
        for x, y in zip(a, b):
            assert type(x["image"]) is type(y["image"]) and x["image"].dtype == torch.float32
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_split_batchable_needs_a_tensor_head_and_a_batchable_tail():
    from torchvision.transforms import v2
    from zoo.data.transforms import SampleTransform, split_batchable

    t = v2.Compose([v2.PILToTensor(), v2.CenterCrop(4), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.2] * 3)])
    head, tail = split_batchable(t)
    assert [type(o) for o in head.transforms] == [v2.PILToTensor, v2.CenterCrop]
    assert [type(o) for o in tail.transforms] == [v2.ToDtype, v2.Normalize]
    image = img(77, size=8)
    assert head(image).dtype == torch.uint8
    assert torch.equal(tail(torch.stack([head(image)] * 3))[1], t(image))
    # nothing to split: no tensor conversion before the tail (PIL images would reach the collate),
    # a random op last, or not a Compose
    pil_only = v2.Compose([v2.CenterCrop(4), v2.ToDtype(torch.float32, scale=True)])
    random_last = v2.Compose([v2.PILToTensor(), v2.RandomHorizontalFlip()])
    for t in (pil_only, random_last, lambda x: x):
        assert split_batchable(t) == (t, None)
    s = SampleTransform(image=pil_only)
    assert s.split() == (s, None)
    with pytest.raises(DataError, match="batch_size"):
        loader("x.tar", transform=s, batch_transform=lambda b: b, batch_size=None)
