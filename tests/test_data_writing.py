"""Shards for every reader: timm's wds reader, wids, plain webdataset; from-folder as torchvision's ImageFolder."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from zoo.cli import main
from zoo.data import loader
from zoo.data.reader import iter_raw_samples
from zoo.data.writer import folder_samples, write_shards

N = 10


def toy(n: int):
    for i in range(n):
        yield {"__key__": f"{i:09d}", "image": Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)), "label": i % 3,
               "caption": f"sample {i}"}


@pytest.fixture
def shards(tmp_path) -> Path:
    out = tmp_path / "shards"
    write_shards(toy(N), out, maxcount=4, info={"name": "toy", "split": "val"})
    return out


def test_written_files(shards):
    assert sorted(p.name for p in shards.iterdir()) == [
        "00000.tar", "00001.tar", "00002.tar", "_info.json", "dataset.json", "shardindex.json", "sizes.json"]
    info = json.loads((shards / "_info.json").read_text())
    assert info["splits"]["val"] == {"name": "val", "num_samples": N, "shard_lengths": [4, 4, 2],
                                     "filenames": ["00000.tar", "00001.tar", "00002.tar"]}


def test_timm_wds_reader_takes_sizes_from_our_info_json(shards):
    timm_data = pytest.importorskip("timm.data")
    ds = timm_data.create_dataset("wds/toy", root=str(shards), split="val")
    assert len(ds) == N
    got = list(ds)
    assert [t for _, t in got] == [i % 3 for i in range(N)]
    assert abs(int(np.asarray(got[7][0])[0, 0, 0]) - 140) <= 2
    (shards / "_info.json").unlink()  # without it timm cannot know the split: the count came from our file
    with pytest.raises(RuntimeError, match="split val not found"):
        timm_data.create_dataset("wds/toy", root=str(shards), split="val")


def test_wids_opens_our_shard_index(shards, tmp_path):
    wids = pytest.importorskip("wids")
    ds = wids.ShardListDataset(str(shards / "shardindex.json"), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert len(ds) == N
    raw = {s["__key__"]: s for s in iter_raw_samples([str(p) for p in sorted(shards.glob("*.tar"))], Counter())}
    for i in (0, 5, 9):  # first shard, middle of the second, last of the third
        s = {k: v.getvalue() if hasattr(v, "getvalue") else v for k, v in ds[i].items()}  # wids hands out BytesIO
        assert s["__key__"] == f"{i:09d}" and s[".cls"] == str(i % 3).encode() and s[".txt"] == f"sample {i}".encode()
        assert s[".jpg"] == raw[f"{i:09d}"]["jpg"]


def test_plain_webdataset_reads_them(shards):
    got = list(wds.WebDataset(str(shards / "{00000..00002}.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(N)]
    assert [s["cls"] for s in got] == [i % 3 for i in range(N)] and got[4]["txt"] == "sample 4"


# -- from-folder as ImageFolder ------------------------------------------------------------------
def make_tree(root: Path) -> None:
    """Nested folders, a hidden class folder, mixed-case extensions, every ImageFolder format, a caption,
    a text file, an unreadable .jpg and a file outside any class folder."""
    rng = np.random.default_rng(0)

    def image(path: str, fmt: str, mode: str = "RGB") -> None:
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        shape = (6, 5, 3) if mode == "RGB" else (6, 5)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(p, format=fmt)

    image("cat/b.JPG", "JPEG")
    image("cat/a.jpeg", "JPEG")
    image("cat/sub/c.png", "PNG")
    image("cat/sub/deeper/d.BMP", "BMP")
    image("cat/sub-x/e.TIF", "TIFF")
    image("dog/f.ppm", "PPM")
    image("dog/g.pgm", "PPM", mode="L")
    image("dog/h.webp", "WEBP")
    image("dog/i.tiff", "TIFF")
    image(".hidden/j.png", "PNG")
    image("stray.png", "PNG")
    (root / "cat" / "a.txt").write_text("a cat")  # the caption of a.jpeg
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")


def test_from_folder_matches_imagefolder(tmp_path, capsys):
    datasets = pytest.importorskip("torchvision.datasets")
    root, out = tmp_path / "tree", tmp_path / "out"
    make_tree(root)
    reference = datasets.ImageFolder(str(root))
    assert main(["shards", "from-folder", str(root), "--out", str(out), "--maxcount", "4"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 samples of 3 classes" in printed
    assert "1 not_image" in printed and "1 unreadable_image" in printed and "1 not_in_class_folder" in printed

    expected = [(os.path.relpath(p, root).replace(os.sep, "/"), y) for p, y in reference.samples
                if not p.endswith("broken.jpg")]  # ImageFolder lists it and fails when it loads it
    ld = loader(str(out / "*.tar"), fields=("image", "label"), optional_fields=("meta", "caption"),
                batch_size=None, shuffle=0)
    got = list(ld)
    assert [(s["meta"]["path"], s["label"]) for s in got] == expected
    assert json.loads((out / "dataset.json").read_text())["classes"] == reference.classes == [".hidden", "cat", "dog"]
    assert [s.get("caption") for s in got if s["meta"]["path"] == "cat/a.jpeg"] == ["a cat"]

    raws = list(iter_raw_samples(sorted(str(p) for p in out.glob("*.tar")), Counter()))
    for raw, (path, label) in zip(raws, expected):
        member = next(k for k in raw if not k.startswith("__") and k not in ("cls", "json", "txt"))
        assert raw[member] == (root / path).read_bytes(), path  # original bytes, every format
        assert member == {"jpeg": "jpg"}.get(Path(path).suffix.lower()[1:], Path(path).suffix.lower()[1:])
    for s, (path, _) in zip(got, expected):  # and zoo decodes each as ImageFolder's loader does
        assert np.array_equal(np.asarray(s["image"]), np.asarray(reference.loader(str(root / path)))), path


def test_from_folder_options(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    skipped: Counter = Counter()
    classes, samples, _ = folder_samples(root, skip_hidden=True, other_as_png=True, skipped=skipped)
    samples = list(samples)
    assert classes == ["cat", "dog"] and skipped["hidden"] == 1
    converted = {s["meta"]["path"]: s for s in samples if s["__image_ext__"] == "png"}
    assert sorted(converted) == ["cat/sub-x/e.TIF", "cat/sub/c.png", "cat/sub/deeper/d.BMP", "dog/f.ppm", "dog/g.pgm",
                                 "dog/i.tiff"]
    for path, s in converted.items():  # lossless: the same pixels
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["image"]))),
                              np.asarray(Image.open(root / path))), path
