"""zoo.data.transforms: eval/train pipelines from pretrained_cfg, multi-crop, paired image+mask, captions."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

import zoo
from zoo.data.transforms import (
    MultiCrop,
    PairedTransform,
    SampleError,
    SampleTransform,
    choose_caption,
    data_config,
    eval_transform,
    train_transform,
)
from zoo.errors import ConfigError, ZooError

CFG_224 = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}
SIMPLE_32 = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.9}


@pytest.fixture(scope="module")
def nano():
    return zoo.create_model("vit_nano_patch4_32")


def _normalised(rgb: tuple[int, int, int], mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


def _random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


# -- cfg validation ------------------------------------------------------------------------------
def test_data_config_from_model_and_dict(nano):
    dc = data_config(nano)
    assert dc.input_size == (3, 32, 32) and dc.size == (32, 32)
    assert dc.mean == tuple(nano.pretrained_cfg["mean"]) and dc.crop_pct == 0.9
    assert data_config({k: CFG_224[k] for k in ("input_size", "mean", "std")}).interpolation == "bicubic"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"mean": None}, "missing 'mean'"),
        ({"input_size": (32, 32)}, "input_size"),
        ({"std": (0.2, 0.2)}, "std must be 3 numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "positive"),
        ({"interpolation": "bicubc"}, "did you mean 'bicubic'"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_bad_cfg_raises_config_error(change, match):
    cfg = {**CFG_224, **change}
    with pytest.raises(ConfigError, match=match):
        eval_transform(cfg)
    with pytest.raises(ConfigError):
        train_transform(cfg)


def test_not_a_cfg_raises_config_error():
    with pytest.raises(ConfigError, match="pretrained_cfg"):
        eval_transform(object())
    with pytest.raises(ConfigError, match="scale"):
        train_transform(CFG_224, scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="hflip"):
        train_transform(CFG_224, hflip=2)


# -- eval ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, image_size", [("nano", (50, 40)), ("nano", (32, 32)), ("224", (300, 260))])
def test_eval_constant_colour_normalises_exactly(nano, which, image_size):
    cfg = nano.pretrained_cfg if which == "nano" else CFG_224
    rgb = (10, 128, 250)
    t = eval_transform(cfg)
    pil = Image.new("RGB", image_size, rgb)
    for image in (pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()):
        x = t(image)
        assert type(x) is torch.Tensor and x.dtype == torch.float32
        assert x.shape == cfg["input_size"]
        expected = _normalised(rgb, cfg["mean"], cfg["std"])[:, None, None].expand_as(x)
        torch.testing.assert_close(x, expected)


def test_eval_geometry_resize_then_center_crop():
    a = np.array(_random_image(35, 35))
    # 32 / 0.9 -> 35: the resize is the identity and the center crop keeps rows/cols 2..33 (torchvision rounds 1.5 to 2)
    ref = (torch.from_numpy(a[2:34, 2:34]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(eval_transform(SIMPLE_32)(Image.fromarray(a)), ref)
    torch.testing.assert_close(eval_transform(SIMPLE_32)(torch.from_numpy(a).permute(2, 0, 1).contiguous()), ref)
    # a 32 px image with crop_pct=1 goes through untouched
    ref = (torch.from_numpy(a[:32, :32]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(eval_transform(SIMPLE_32, crop_pct=1.0)(Image.fromarray(a[:32, :32])), ref)
    # shorter side to int(224 / 0.875) = 256, then the central 224
    t = eval_transform(CFG_224)
    assert t.transforms[1].size == [256]
    assert t(_random_image(480, 640)).shape == (3, 224, 224)
    # grey input for an RGB model is converted
    assert t(Image.new("L", (300, 300), 7)).shape == (3, 224, 224)


# -- train ---------------------------------------------------------------------------------------
def test_train_shapes_and_determinism(nano):
    image = _random_image(60, 80)
    t = train_transform(nano, color_jitter=0.4, grayscale=0.2, blur=0.5, solarize=0.2)
    torch.manual_seed(1)
    a = t(image)
    torch.manual_seed(1)
    b = t(image)
    torch.manual_seed(2)
    c = t(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert t(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()).shape == (3, 32, 32)


def test_train_crop_box_respects_scale_and_ratio():
    image = _random_image(100, 120)
    scale, ratio = (0.2, 0.6), (3 / 4, 4 / 3)
    t = train_transform(SIMPLE_32, scale=scale, ratio=ratio, hflip=0.0)
    crop = t.transforms[1]
    torch.manual_seed(0)
    areas = []
    for _ in range(500):
        p = crop.make_params([image])
        area = p["height"] * p["width"] / (100 * 120)
        assert scale[0] * 0.9 <= area <= scale[1] * 1.1  # up to rounding of height and width to pixels
        assert ratio[0] * 0.9 <= p["width"] / p["height"] <= ratio[1] * 1.1
        assert 0 <= p["top"] <= 100 - p["height"] and 0 <= p["left"] <= 120 - p["width"]
        areas.append(area)
    assert 0.3 < np.mean(areas) < 0.5 and min(areas) < 0.25 and max(areas) > 0.55
    # the pipeline crops exactly the box its seeded call draws
    torch.manual_seed(7)
    p = crop.make_params([image])
    torch.manual_seed(7)
    out = t(image)
    ref = F.resized_crop(image, **p, size=[32, 32], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    ref = F.normalize(F.to_dtype(F.to_image(ref), torch.float32, scale=True), [0.5] * 3, [0.25] * 3)
    torch.testing.assert_close(out, ref.as_subclass(torch.Tensor))


def test_train_flip_probability():
    image = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)))
    t = train_transform(SIMPLE_32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, interpolation="nearest")
    torch.manual_seed(0)
    flipped = sum(bool((x := t(image))[0, 0, 0] > x[0, 0, -1]) for _ in range(200))
    assert 70 < flipped < 130


# -- multi-crop ----------------------------------------------------------------------------------
def test_multicrop_counts_and_sizes(nano):
    image = _random_image(64, 64)
    views = MultiCrop(nano)(image)  # patch size 4 inferred from the model: local 32 * 3/7 -> 12
    assert len(views) == 8
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 6
    assert all(v.dtype == torch.float32 for v in views)

    mc = MultiCrop(CFG_224, n_global=2, n_local=10, patch_size=16)
    assert mc.global_size == (224, 224) and mc.local_size == (96, 96) and len(mc.views) == 12
    assert MultiCrop(CFG_224).local_size == (96, 96)
    assert MultiCrop({**SIMPLE_32, "input_size": (3, 16, 16)}).local_size == (8, 8)  # at least 8 px

    views = MultiCrop(SIMPLE_32, n_global=1, n_local=0, global_size=24)(image)
    assert [v.shape for v in views] == [(3, 24, 24)]
    views = MultiCrop(SIMPLE_32, n_global=3, n_local=2, local_size=(8, 12))(image)
    assert [v.shape[1:] for v in views] == [(32, 32)] * 3 + [(8, 12)] * 2
    with pytest.raises(ConfigError, match="divisible"):
        MultiCrop(nano, local_size=10)
    with pytest.raises(ConfigError):
        MultiCrop(SIMPLE_32, n_global=0)


def test_multicrop_deterministic_and_views_differ(nano):
    image = _random_image(64, 64)
    mc = MultiCrop(nano)
    torch.manual_seed(3)
    a = mc(image)
    torch.manual_seed(3)
    b = mc(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[2], a[3])


# -- captions ------------------------------------------------------------------------------------
PROBS = {"exact": 0.5, "short": 0.3, "noisy": 0.2}


def _caption_sample(**captions):
    return {"image": None, "caption": captions.pop("exact", None), "meta": {"captions": captions}}


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_choose_caption_frequencies(rng):
    sample = {"exact": "a photo of a red circle", "meta": {"captions": {"short": "red circle", "noisy": "IMG_0042"}}}
    counts = Counter(choose_caption(sample, PROBS, rng)[0] for _ in range(2000))
    for name, p in PROBS.items():
        assert abs(counts[name] / 2000 - p) < 0.04, counts
    assert choose_caption(sample, {"short": 1.0}, rng) == ("short", "red circle")


def test_choose_caption_renormalises_over_present():
    # the txt member ("caption") plus one meta caption; "short" is missing
    sample = {"caption": "alt text", "meta": {"captions": {"noisy": "IMG_0042", "short": ""}}}
    rng = random.Random(1)
    probs = {"caption": 0.5, "short": 0.3, "noisy": 0.2}
    counts = Counter(choose_caption(sample, probs, rng) for _ in range(2000))
    assert set(counts) == {("caption", "alt text"), ("noisy", "IMG_0042")}
    assert abs(counts[("caption", "alt text")] / 2000 - 0.5 / 0.7) < 0.04


def test_choose_caption_lists_torch_rng_and_errors():
    sample = {"meta": {"captions": {"syn": ["one", "two", "three", "four"]}}}
    torch.manual_seed(0)
    a = [choose_caption(sample, {"syn": 1.0}) for _ in range(400)]  # rng=None: torch's global RNG
    torch.manual_seed(0)
    assert a == [choose_caption(sample, {"syn": 1.0}) for _ in range(400)]
    counts = Counter(text for _, text in a)
    assert set(counts) == {"one", "two", "three", "four"} and min(counts.values()) > 60
    with pytest.raises(ZooError, match="none of the captions"):
        choose_caption({"caption": "x", "meta": {}}, {"short": 0.5, "noisy": 0.5}, random.Random(0))
    with pytest.raises(SampleError):
        choose_caption({"caption": "x"}, {"caption": 0.0, "short": 1.0}, random.Random(0))
    with pytest.raises(ConfigError):
        choose_caption({"caption": "x"}, {"caption": -1.0}, random.Random(0))
    with pytest.raises(ConfigError):
        choose_caption({"caption": "x"}, {}, random.Random(0))


# -- paired image + mask -------------------------------------------------------------------------
def _scene(h: int = 48, w: int = 64, seed: int = 0):
    """A mask of random rectangles (classes 0..5) and an image whose grey value is 40 * class."""
    rs = np.random.RandomState(seed)
    mask = np.zeros((h, w), np.uint8)
    for k in range(1, 6):
        y, x = rs.randint(0, h - 8), rs.randint(0, w - 8)
        mask[y : y + rs.randint(6, h // 2), x : x + rs.randint(6, w // 2)] = k
    grey = (mask * 40).astype(np.uint8)
    return {"image": Image.fromarray(np.stack([grey] * 3, -1)), "mask": mask, "thermal": Image.fromarray(grey),
            "label": 3, "caption": "shapes"}


def _grey_of(x: torch.Tensor) -> torch.Tensor:
    """Undo SIMPLE_32's normalisation back to 0..255."""
    return ((x * 0.25 + 0.5) * 255).round()


def test_paired_transform_keeps_image_and_mask_aligned():
    pt = PairedTransform(SIMPLE_32, train=True, scale=(0.1, 0.6), hflip=0.5, interpolation="nearest")
    flips = 0
    for seed in range(20):
        sample = _scene(seed=seed)
        torch.manual_seed(seed)
        out = pt(sample)
        image, mask = out["image"], out["mask"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.long
        assert set(mask.unique().tolist()) <= set(np.unique(sample["mask"]).tolist())
        for c in range(3):
            assert torch.equal(_grey_of(image[c]), (mask * 40).float())
        assert out["thermal"].shape == (1, 32, 32) and out["thermal"].dtype == torch.float32
        assert torch.equal((out["thermal"][0] * 255).round(), (mask * 40).float())
        assert out["label"] == 3 and out["caption"] == "shapes"
        # the same seed without the flip tells whether this draw flipped
        torch.manual_seed(seed)
        noflip = PairedTransform(SIMPLE_32, scale=(0.1, 0.6), hflip=0.0, interpolation="nearest")(sample)["mask"]
        flips += not torch.equal(noflip, mask)
        assert torch.equal(noflip.flip(-1) if not torch.equal(noflip, mask) else noflip, mask)
    assert 3 <= flips <= 17


def test_paired_transform_bicubic_mask_stays_on_the_image_grid():
    # Masks resample pixel-centre aligned (nearest-exact), like the bicubic image; torchvision's
    # default Mask resampling (legacy nearest, half a pixel off) scores about 5.1 here, this about 3.0.
    pt = PairedTransform(SIMPLE_32, scale=(0.3, 1.0))  # the cfg's bicubic for the image
    errors = []
    for seed in range(10):
        torch.manual_seed(seed)
        out = pt(_scene(96, 128, seed=seed))
        assert out["mask"].dtype == torch.long
        errors.append(float((_grey_of(out["image"][0]) - out["mask"] * 40).abs().mean()))
    assert np.mean(errors) < 4.0


def test_paired_transform_deterministic_and_photometric_only_on_image():
    pt = PairedTransform(SIMPLE_32, color_jitter=0.8, interpolation="nearest")
    sample = _scene(seed=4)
    torch.manual_seed(5)
    a = pt(sample)
    torch.manual_seed(5)
    b = pt(sample)
    assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "thermal"))
    assert torch.equal((a["thermal"][0] * 255).round(), (a["mask"] * 40).float())  # thermal not jittered


def test_paired_transform_eval_matches_eval_transform_and_other_inputs():
    sample = _scene(seed=2)
    sample["mask"] = Image.fromarray(sample["mask"])  # a PIL "L" mask works too
    out = PairedTransform(SIMPLE_32, train=False)(sample)
    image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).contiguous()
    torch.testing.assert_close(out["image"], eval_transform(SIMPLE_32)(image))
    assert out["mask"].shape == (32, 32) and out["mask"].dtype == torch.long

    many = np.arange(48 * 64, dtype=np.int32).reshape(48, 64) % 300  # more classes than uint8 holds
    out = PairedTransform(SIMPLE_32, modalities=())({**sample, "mask": many})
    assert set(out["mask"].unique().tolist()) <= set(range(300)) and out["mask"].max() > 255
    assert out["thermal"] is sample["thermal"]  # not a listed modality: passed through
    assert "mask" not in PairedTransform(SIMPLE_32)({"image": sample["image"]})
    with pytest.raises(SampleError, match="differ in size"):
        PairedTransform(SIMPLE_32)({"image": sample["image"], "mask": np.zeros((10, 10), np.uint8)})


# -- sample glue ---------------------------------------------------------------------------------
def test_sample_transform_applies_per_field_and_passes_the_rest(nano):
    sample = {"image": Image.new("RGB", (40, 40), (1, 2, 3)), "label": 4, "caption": "c", "meta": {"a": 1}}
    st = SampleTransform(image=eval_transform(nano), thermal=lambda x: x * 2)
    out = st(sample)
    assert out["image"].shape == (3, 32, 32)
    assert out["label"] == 4 and out["caption"] == "c" and out["meta"] == {"a": 1} and "thermal" not in out
    assert isinstance(sample["image"], Image.Image)  # the input dict is left alone
    assert st({**sample, "thermal": 3})["thermal"] == 6
    views = SampleTransform(image=MultiCrop(nano, n_local=2))(sample)["image"]
    assert len(views) == 4
