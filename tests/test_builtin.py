"""Built-in datasets (zoo.data.builtin): determinism, field types, and that each is the task it says."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from PIL import Image

from zoo.data.builtin import fractals, generate, scenes
from zoo.data.fields import decode_field, encode_field
from zoo.errors import UnknownNameError
from zoo.registry import DATASETS

NAMES = ("fractals", "scenes", "digits")
_CACHE: dict[tuple, list[dict]] = {}


def samples(name: str, n: int, **kw) -> list[dict]:
    """Generated once per test session (several tests look at the same samples)."""
    k = (name, n, tuple(sorted(kw.items())))
    if k not in _CACHE:
        _CACHE[k] = list(generate(name, n, **kw))
    return _CACHE[k]


def as_bytes(sample: dict) -> dict:
    """A sample with every image / array replaced by its raw bytes, for exact comparisons."""
    out = {}
    for f, v in sample.items():
        if isinstance(v, Image.Image):
            out[f] = (v.mode, v.size, v.tobytes())
        elif isinstance(v, np.ndarray):
            out[f] = (v.dtype.str, v.shape, v.tobytes())
        else:
            out[f] = v
    return out


# -- registry ------------------------------------------------------------------------------------
def test_registered_with_meta():
    assert {"fractals", "scenes", "digits"} <= set(DATASETS.names())
    for name in NAMES:
        meta = DATASETS.get(name).meta
        assert meta["num_classes"] >= 2 and meta["description"]
        assert {"image", "label", "meta"} <= set(meta["fields"])
    assert DATASETS.get("scenes").meta["fields"] == ("image", "label", "caption", "meta", "mask", "thermal", "depth")
    assert DATASETS.get("scenes").meta["num_classes"] == len(scenes.SHAPES)
    assert DATASETS.get("digits").meta["max_samples"] == {"train": 1438, "val": 359}


def test_unknown_dataset_and_split_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown dataset 'nope'"):
        generate("nope", 3)
    with pytest.raises(UnknownNameError, match="did you mean: fractals"):
        generate("fractal", 3)
    with pytest.raises(UnknownNameError, match="did you mean: train"):
        generate("scenes", 3, split="trian")
    with pytest.raises(UnknownNameError, match="val"):
        generate("digits", 3, split="test")
    with pytest.raises(ValueError, match="size"):
        generate("fractals", 3, size=4)
    with pytest.raises(ValueError, match="n must be"):
        generate("scenes", -1)
    with pytest.raises(TypeError):
        generate("digits", 3, num_classes=5)  # a keyword the dataset does not take


# -- determinism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_and_index_independent_of_n(name):
    a = [as_bytes(s) for s in generate(name, 6, seed=3)]
    b = [as_bytes(s) for s in generate(name, 6, seed=3)]
    assert a == b
    longer = [as_bytes(s) for s in generate(name, 40, seed=3)]
    assert longer[:6] == a
    assert [as_bytes(s) for s in generate(name, 3, seed=3, start=20)] == longer[20:23]  # any order, any chunk
    assert [s["__key__"] for s in longer[:3]] == ["000000000", "000000001", "000000002"]


@pytest.mark.parametrize("name", NAMES)
def test_seeds_and_splits_differ(name):
    base = [as_bytes(s)["image"] for s in generate(name, 8, seed=0)]
    other_seed = [as_bytes(s)["image"] for s in generate(name, 8, seed=1)]
    val = [as_bytes(s)["image"] for s in generate(name, 8, seed=0, split="val")]
    assert sum(x != y for x, y in zip(base, other_seed)) >= 6
    assert not set(base) & set(val)  # different instances


def test_train_and_val_share_classes():
    for name in NAMES:
        tr = {s["label"] for s in samples(name, 300)}
        va = {s["label"] for s in samples(name, 300, split="val")}
        assert tr == va == set(range(DATASETS.get(name).meta["num_classes"])), name


# -- fields --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [32, 64, 224])
def test_fields_types_and_shapes(name, size):
    n = 40 if size == 32 else 4
    meta = DATASETS.get(name).meta
    for i, s in enumerate(generate(name, n, size=size, seed=1)):
        assert set(s) == {"__key__", *meta["fields"]}
        assert s["__key__"] == f"{i:09d}"
        assert isinstance(s["image"], Image.Image) and s["image"].mode == "RGB" and s["image"].size == (size, size)
        assert type(s["label"]) is int and 0 <= s["label"] < meta["num_classes"]
        assert json.loads(json.dumps(s["meta"])) == s["meta"]
        if name == "scenes":
            assert isinstance(s["caption"], str) and s["caption"]
            assert s["mask"].dtype == np.uint8 and s["mask"].shape == (size, size)
            assert s["mask"].max() <= len(scenes.SHAPES)
            for f in ("thermal", "depth"):
                assert s[f].mode == "L" and s[f].size == (size, size)


def test_fields_survive_shard_encoding():
    """Every field encodes with zoo's field table and decodes back to the same value (image as png)."""
    s = samples("scenes", 300)[0]
    for field, value in s.items():
        if field == "__key__":
            continue
        ext, data = encode_field(field, value, image_format="png")
        back = decode_field(field, ext, data)
        assert as_bytes({field: back}) == as_bytes({field: value}), field
    assert encode_field("thermal", s["thermal"])[0] == "thermal.png"
    assert encode_field("mask", s["mask"])[0] == "seg.png"


def test_fractals_num_classes_keyword():
    got = list(generate("fractals", 200, num_classes=25))
    labels = {s["label"] for s in got}
    assert labels <= set(range(25)) and len(labels) >= 20
    # a class's system does not depend on how many classes there are
    assert fractals.class_ifs(0, 3) is fractals.class_ifs(0, 3)


# -- fractals ------------------------------------------------------------------------------------
def _foreground(img: Image.Image) -> np.ndarray:
    """|value - background value| per pixel (HSV value; the background estimated from the border)."""
    v = np.asarray(img).max(2).astype(np.float64)
    border = np.concatenate([v[0], v[-1], v[:, 0], v[:, -1]])
    return np.abs(v - np.median(border))


def test_fractal_images_are_not_blank():
    for s in samples("fractals", 300):
        covered = (_foreground(s["image"]) > 70).mean()  # background spread <= 64, fractal contrast >= ~100
        assert 0.1 < covered < 0.8, (s["__key__"], covered)


def test_fractal_systems_are_contractive_and_fill_the_canvas():
    for c in range(10):
        ifs = fractals.class_ifs(0, c)
        a, _ = ifs.maps()
        assert 2 <= len(a) <= 4
        assert np.linalg.svd(a, compute_uv=False).max() < 1
        assert fractals.fill_rate(ifs, np.random.default_rng(c)) >= 0.15
    assert fractals.class_ifs(0, 0).b.tobytes() != fractals.class_ifs(1, 0).b.tobytes()  # seed-dependent classes


def test_fractal_classes_are_distinguishable():
    """Nearest class centroid on colour-blind 8x8 foreground maps: well above chance (10%) despite
    random rotation, flip, colour and background."""

    def feats(ss):
        x = np.stack([_foreground(s["image"]).reshape(8, 4, 8, 4).mean((1, 3)).ravel() for s in ss])
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9), np.array([s["label"] for s in ss])

    xtr, ytr = feats(samples("fractals", 300))
    xva, yva = feats(samples("fractals", 300, split="val"))
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    pred = ((xva[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yva).mean() > 0.3


# -- scenes --------------------------------------------------------------------------------------
def test_scene_masks_agree_with_images():
    for s in samples("scenes", 300):
        img = np.asarray(s["image"]).astype(np.int64)
        mask, objects = s["mask"], s["meta"]["objects"]
        for k in np.unique(mask[mask > 0]):
            colours = np.array([o["rgb"] for o in objects if scenes.SHAPES.index(o["shape"]) + 1 == k])
            assert len(colours), (s["__key__"], k)
            px = img[mask == k]
            assert (np.abs(px[:, None] - colours[None]).max(-1) == 0).any(1).all(), s["__key__"]  # an object's colour
        bg = img[mask == 0]
        for o in objects:  # background pixels are never an object's colour
            assert np.abs(bg - np.array(o["rgb"])).max(-1).min(initial=255) > 25, s["__key__"]
        for o in objects:  # each object is visible where its bbox says
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            inside = mask[y0:y1, x0:x1] == scenes.SHAPES.index(o["shape"]) + 1
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        shapes_in_mask = set(np.unique(mask[mask > 0]) - 1)
        assert shapes_in_mask == {scenes.SHAPES.index(o["shape"]) for o in objects}  # nothing fully hidden


def test_scene_thermal_and_depth_render_the_same_scene():
    for s in samples("scenes", 300)[:100]:
        mask, objects = s["mask"], s["meta"]["objects"]
        thermal = np.asarray(s["thermal"]).astype(np.float64)
        depth = np.asarray(s["depth"])
        assert thermal[mask > 0].mean() > thermal[mask == 0].mean() + 40  # objects warmer than the background
        levels = {int(np.floor(o["depth"] * 255 + 0.5)) for o in objects}
        assert set(np.unique(depth[mask > 0]).tolist()) <= levels  # constant per-object depth
        assert depth[mask > 0].min() > depth[mask == 0].max()  # objects nearer than the ground
        rows = depth.astype(np.float64).mean(1, where=mask == 0)
        ok = ~np.isnan(rows)
        assert np.all(np.diff(rows[ok]) >= 0)  # ground plane: nearer towards the bottom
        zs = sorted(objects, key=lambda o: o["z"])
        assert [o["depth"] for o in zs] == sorted(o["depth"] for o in objects)  # nearer objects in front


def test_scene_label_is_the_largest_shape():
    counts = np.zeros(len(scenes.SHAPES), int)
    for s in samples("scenes", 300):
        objects = s["meta"]["objects"]
        largest = max(objects, key=lambda o: o["radius"])
        assert s["label"] == scenes.SHAPES.index(largest["shape"]) == s["meta"]["class"]
        sizes = [o["size"] for o in objects]
        assert len(set(sizes)) == len(sizes) and 1 <= len(objects) <= 3  # never a tie for the largest
        assert largest["size"] == max(sizes, key=["small", "medium", "large"].index)
        counts[s["label"]] += 1
    assert counts.min() > 20  # roughly balanced over the 6 shapes


def test_scene_captions_and_quality():
    kinds = set()
    for s in samples("scenes", 300):
        meta = s["meta"]
        caps, q = meta["captions"], meta["quality"]
        assert s["caption"] == caps["exact"]
        for o in meta["objects"]:
            assert f"{o['size']} {o['color']} {o['shape']}" in caps["exact"]
        assert caps["exact"].endswith(f"on a {scenes.BACKGROUNDS[meta['background']]} background")
        largest = meta["objects"][0]
        article = "an" if largest["color"][0] in "aeiou" else "a"
        assert caps["short"] == f"{article} {largest['color']} {largest['shape']}"
        assert q["exact"] == 1.0 > q["short"] and q["exact"] > q["noisy"]
        assert all(0.0 <= v <= 1.0 for v in q.values())
        kind = meta["noisy_kind"]
        kinds.add(kind)
        if kind == "offtopic":
            assert q["noisy"] <= 0.2
            assert not any(w in caps["noisy"].lower() for w in scenes.SHAPES)
        elif kind == "wrong":
            assert (largest["color"] not in caps["noisy"].lower()) or (largest["shape"] not in caps["noisy"].lower())
            assert q["noisy"] < q["short"]
        else:
            assert largest["color"] in caps["noisy"].lower() and largest["shape"] in caps["noisy"].lower()
    assert kinds == {"loose", "wrong", "offtopic"}


def test_scene_position_words():
    assert scenes.position_word(2, 2, 32) == "top left"
    assert scenes.position_word(16, 16, 32) == "center"
    assert scenes.position_word(30, 16, 32) == "right"
    assert scenes.position_word(16, 31, 32) == "bottom"


# -- digits --------------------------------------------------------------------------------------
def test_digits_split_sizes_and_labels():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train = samples("digits", 5000)
    val = samples("digits", 5000, split="val")
    assert (len(train), len(val)) == (1438, 359) and len(train) + len(val) == len(target) == 1797
    src_tr = [s["meta"]["source_index"] for s in train]
    src_va = [s["meta"]["source_index"] for s in val]
    assert not set(src_tr) & set(src_va) and sorted(src_tr + src_va) == list(range(1797))
    assert all(s["label"] == target[s["meta"]["source_index"]] for s in train + val)
    frac = np.bincount(target[src_va], minlength=10) / np.bincount(target, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.02)  # stratified
    # the split is fixed; the seed only reorders it
    other = list(generate("digits", 5000, seed=7, split="val"))
    assert sorted(s["meta"]["source_index"] for s in other) == sorted(src_va)
    assert [s["meta"]["source_index"] for s in other] != src_va
    assert len(list(generate("digits", 10, split="val", start=355))) == 4


def test_digits_look_like_sklearns():
    from sklearn.datasets import load_digits

    d = load_digits()
    s = next(generate("digits", 1, size=8))
    src = s["meta"]["source_index"]
    img = np.asarray(s["image"])
    assert np.array_equal(img[..., 0], img[..., 2])  # grey, replicated to RGB
    assert np.abs(img[..., 0].astype(int) - d.images[src] * 255 / 16).max() <= 1


def test_digits_nearest_neighbour_is_a_real_task():
    def xy(ss):
        return (np.stack([np.asarray(s["image"])[..., 0].ravel() for s in ss]).astype(np.float64),
                np.array([s["label"] for s in ss]))

    xtr, ytr = xy(samples("digits", 5000))
    xva, yva = xy(samples("digits", 5000, split="val"))
    d2 = (xva**2).sum(1)[:, None] - 2 * xva @ xtr.T + (xtr**2).sum(1)[None]
    assert (ytr[d2.argmin(1)] == yva).mean() > 0.9


def test_fractals_coarse_merges_fine_classes_and_keeps_them(tmp_path):
    """LOOK's data: 4 super-classes of 5 unrelated fractal classes; the fine class rides along as `fine.cls`."""
    from zoo.data import loader
    from zoo.data.builtin import materialize

    coarse, fine = samples("fractals_coarse", 60), samples("fractals", 60, num_classes=20)
    assert [s["fine"] for s in coarse] == [s["label"] for s in fine]  # the same images, the fine labels kept
    assert all(as_bytes(c)["image"] == as_bytes(f)["image"] for c, f in zip(coarse, fine))
    assert [s["label"] for s in coarse] == [s["fine"] % 4 for s in coarse]
    assert set(s["label"] for s in coarse) == {0, 1, 2, 3} and len({s["fine"] for s in coarse}) > 10
    assert DATASETS.get("fractals_coarse").meta["num_classes"] == 4
    assert encode_field("fine", 7) == ("fine.cls", b"7") and decode_field("fine", "fine.cls", b"7") == 7
    pattern = materialize("fractals_coarse", "val", 24, root=tmp_path)
    (batch,) = loader(pattern, fields=("label", "fine"), batch_size=24, shuffle=0)
    assert batch["fine"].tolist() == [s["fine"] for s in generate("fractals_coarse", 24, split="val")]
    assert torch.equal(batch["label"], batch["fine"] % 4)
