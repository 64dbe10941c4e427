"""JPEG `image` fields decode through simplejpeg where that is pixel-identical to PIL, and through PIL otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from zoo.data import fields
from zoo.data.builtin import generate
from zoo.data.fields import FieldError, decode_field

simplejpeg = pytest.importorskip("simplejpeg")


def _pil_rgb(data: bytes) -> Image.Image:
    """What the loader gave before simplejpeg: PIL's decode, converted to RGB."""
    img = Image.open(io.BytesIO(data), formats=("JPEG",))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def _picture(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // w, y * 255 // h, (x + y) * 7 % 256], -1)
    noise = rng.integers(0, 256, (h, w, 3))
    img = Image.fromarray(((smooth + noise) // 2).astype(np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _varied() -> dict[str, bytes]:
    """JPEGs across colour spaces, subsamplings, qualities, progressive/optimized coding and odd sizes."""
    old, ImageFile.MAXBLOCK = ImageFile.MAXBLOCK, 1 << 22  # PIL's progressive writer needs room
    try:
        out = {}
        for i, (w, h) in enumerate([(1, 1), (2, 3), (7, 13), (17, 16), (64, 64), (131, 77), (300, 299)]):
            for sub in (0, 1, 2):
                out[f"rgb_{w}x{h}_sub{sub}"] = _jpeg(_picture("RGB", w, h, i), quality=(50, 90, 100)[sub], subsampling=sub)
            out[f"progressive_{w}x{h}"] = _jpeg(_picture("RGB", w, h, i), quality=75, progressive=True)
            out[f"optimized_{w}x{h}"] = _jpeg(_picture("RGB", w, h, i), quality=10, optimize=True)
            out[f"gray_{w}x{h}"] = _jpeg(_picture("L", w, h, i), quality=85)
            out[f"gray_progressive_{w}x{h}"] = _jpeg(_picture("L", w, h, i), progressive=True)
            out[f"cmyk_{w}x{h}"] = _jpeg(_picture("CMYK", w, h, i), quality=90)
            out[f"stored_rgb_{w}x{h}"] = _jpeg(_picture("RGB", w, h, i), keep_rgb=True)
        for sub in ("440", "411"):  # subsamplings PIL does not write
            out[f"rgb_{sub}"] = simplejpeg.encode_jpeg(np.asarray(_picture("RGB", 29, 31, 0)), quality=80, colorsubsampling=sub)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90°: neither path transposes
        out["exif_orientation"] = _jpeg(_picture("RGB", 40, 30, 0), exif=exif)
        for i, s in enumerate(generate("scenes", 4, size=64)):
            out[f"scenes_{i}"] = _jpeg(s["image"], quality=90)
        return out
    finally:
        ImageFile.MAXBLOCK = old


VARIED = _varied()


@pytest.mark.parametrize("ext", ["jpg", "jpeg"])
def test_jpeg_images_equal_pil(ext):
    for name, data in VARIED.items():
        got, want = decode_field("image", ext, data), _pil_rgb(data)
        assert isinstance(got, Image.Image) and got.mode == "RGB" and got.size == want.size, name
        assert np.array_equal(np.asarray(got), np.asarray(want)), name


def test_routing_sends_cmyk_to_pil():
    for name, data in VARIED.items():
        routed = fields._jpeg_rgb(data) is not None
        assert routed == (not name.startswith("cmyk")), name


def test_other_jpeg_fields_keep_pil_modes():
    data = VARIED["gray_17x16"]
    assert decode_field("thermal", "thermal.jpg", data).mode == "L"  # a modality keeps its own mode
    assert np.asarray(decode_field("mask", "jpg", data)).ndim == 2


def _reason(data: bytes) -> str:
    with pytest.raises(FieldError) as e:
        decode_field("image", "jpg", data)
    return e.value.reason


CORRUPT = {
    "empty": b"",
    "garbage": bytes(range(256)) * 3,
    "header_only": VARIED["scenes_0"][:200],
    "truncated": VARIED["scenes_0"][: len(VARIED["scenes_0"]) // 2],
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_jpeg_fails_as_before(name, monkeypatch):
    now = _reason(CORRUPT[name])
    monkeypatch.setattr(fields, "simplejpeg", None)
    assert now == _reason(CORRUPT[name]) == "undecodable_image"


def test_flipped_bytes_decode_or_fail_as_pil_does(monkeypatch):
    rng = np.random.default_rng(0)
    for data in (VARIED["scenes_1"], VARIED["progressive_64x64"]):
        for _ in range(25):
            x = bytearray(data)
            x[rng.integers(len(x))] = int(rng.integers(256))
            outcomes = []
            for mod in (simplejpeg, None):
                monkeypatch.setattr(fields, "simplejpeg", mod)
                try:
                    outcomes.append(np.asarray(decode_field("image", "jpg", bytes(x))).tobytes())
                except FieldError as e:
                    outcomes.append(e.reason)
            assert outcomes[0] == outcomes[1]


def test_png_bytes_in_a_jpg_member_still_decode():
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, "PNG")
    assert decode_field("image", "jpg", buf.getvalue()).getpixel((0, 0)) == (1, 2, 3)


def test_without_simplejpeg_pil_decodes(monkeypatch):
    monkeypatch.setattr(fields, "simplejpeg", None)
    for name in ("scenes_2", "gray_7x13", "cmyk_64x64", "progressive_131x77"):
        got = decode_field("image", "jpg", VARIED[name])
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(_pil_rgb(VARIED[name]))), name
