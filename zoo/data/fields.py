"""The one mapping between a webdataset sample's file extensions and zoo's field names.

Reading: `jpg|jpeg|png|webp` (and `ppm|pgm|bmp|tif|tiff`, as torchvision's ImageFolder) -> `image`,
`cls` -> `label`, `txt` -> `caption`, `json` -> `meta`, `seg.png` -> `mask`, `npy` -> `array`, and a named modality `NAME.png|jpg|npy|pth|txt|cls` -> `NAME`
(e.g. `thermal.png` -> `thermal`, a 1-channel image; `emb.pth` -> `emb`, read with `weights_only=True`; `fine.cls` -> `fine`,
a second integer label such as a fine class beside a coarse `label`). Writing uses the same table backwards, so shards we write read
back field for field (and plain webdataset / img2dataset / timm / open_clip tools read them).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo without PIL's per-image overhead; optional at runtime, PIL decodes all without it
    import simplejpeg
except ImportError:  # pragma: no cover - it is a dependency
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
FIXED: dict[str, str] = {"cls": "label", "txt": "caption", "json": "meta", "seg.png": "mask", "npy": "array"}
FIXED.update({ext: "image" for ext in IMAGE_EXTS})
# What a field is written as when it has no extension of its own.
WRITE_EXT: dict[str, str] = {"image": "jpg", "label": "cls", "caption": "txt", "meta": "json", "mask": "seg.png", "array": "npy"}


def field_of(ext: str) -> str:
    """The zoo field name for a member extension: `jpg` -> `image`, `thermal.png` -> `thermal`."""
    ext = ext.lower()
    if ext in FIXED:
        return FIXED[ext]
    return ext.split(".", 1)[0]


def ext_of(field: str, value: object = None) -> str:
    """The member extension a field is written with: `image` -> `jpg`, `thermal` (an image) -> `thermal.png`."""
    if field in WRITE_EXT:
        return WRITE_EXT[field]
    if isinstance(value, np.ndarray):
        return f"{field}.npy"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{field}.cls"  # another integer label (a fine class beside the coarse `label`)
    if _holds_torch(value):  # a tensor or a dict of them, without importing torch here
        return f"{field}.pth"
    if isinstance(value, dict):
        return f"{field}.json"
    if isinstance(value, str):
        return f"{field}.txt"
    return f"{field}.png"  # other modalities are images (thermal, depth): lossless


def _holds_torch(value: object) -> bool:
    """A torch tensor, or a non-empty dict of them (written as `.pth`, read back with weights_only=True)."""
    if isinstance(value, dict):
        return bool(value) and all(_holds_torch(v) for v in value.values())
    return type(value).__module__.startswith("torch")


# -- bytes <-> values ---------------------------------------------------------------------------
class FieldError(ValueError):
    """A member whose bytes do not decode as its extension says; `reason` names the skip counter."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


_PIL_FORMATS = {"jpg": ("JPEG",), "jpeg": ("JPEG",), "png": ("PNG",), "webp": ("WEBP",), "ppm": ("PPM",),
                "pgm": ("PPM",), "bmp": ("BMP",), "tif": ("TIFF",), "tiff": ("TIFF",)}


# JPEG colour spaces whose simplejpeg RGB decode is pixel-identical to PIL's decode + convert("RGB")
# (checked across qualities, 4:4:4/4:2:2/4:2:0/4:4:0/4:1:1, progressive, optimized, sizes 1..300).
# CMYK differs (PIL converts CMYK->RGB itself); it and YCCK (also 4-channel CMYK) stay with PIL, as does any other.
_SIMPLEJPEG_SPACES = ("YCbCr", "Gray", "RGB")


def _jpeg_rgb(data: bytes):
    """JPEG bytes decoded to an RGB image by simplejpeg, or None where PIL should decode them."""
    if simplejpeg is None:
        return None
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        if space not in _SIMPLEJPEG_SPACES or (Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS):
            return None  # PIL's colour handling, or its decompression-bomb warning/error
        # accurate DCT and fancy upsampling (the defaults), as PIL; strict: any libjpeg warning goes to PIL
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False))
    except Exception:  # not a JPEG, truncated, corrupt: PIL decodes or fails it exactly as before
        return None


def _image(data: bytes, mode: str | None, ext: str = ""):
    if mode == "RGB" and ext in ("jpg", "jpeg"):
        img = _jpeg_rgb(data)
        if img is not None:
            return img
    # the extension names the format, so PIL need not probe every plugin; a wrong one still fails clearly
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(ext))
    except UnidentifiedImageError:  # e.g. PNG bytes in a .jpg member, common in scraped data
        img = Image.open(io.BytesIO(data))
    img.load()  # decode now: truncated or garbage bytes fail here, not in a transform
    return img.convert(mode) if mode and img.mode != mode else img


def decode_field(field: str, ext: str, data: bytes):
    """The python value of one member: PIL image, int label, str, dict, or numpy array."""
    last = ext.rsplit(".", 1)[-1].lower()
    try:
        if field == "label" or last == "cls":
            return int(data.decode("ascii").strip())
        if field == "mask":
            return np.array(_image(data, None, last))
        if last in IMAGE_EXTS:
            return _image(data, "RGB" if field == "image" else None, last)
        if last == "txt":
            return data.decode("utf-8")
        if last == "json":
            return json.loads(data.decode("utf-8"))
        if last == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if last in ("pth", "pt"):
            import torch

            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (UnicodeDecodeError, ValueError) as e:
        reason = "bad_label" if last == "cls" else {"caption": "bad_text", "meta": "bad_json"}.get(field, f"bad_{field}")
        raise FieldError(reason, str(e)[:120]) from None
    except Exception as e:  # PIL (and torch.load) raise many types on garbage or unsafe bytes
        reason = "undecodable_image" if field == "image" else f"undecodable_{field}"
        raise FieldError(reason, f"{type(e).__name__}: {str(e)[:120]}") from None
    return data


def encode_field(field: str, value, *, image_format: str = "jpg", quality: int = 95) -> tuple[str, bytes]:
    """(member extension, bytes) for one field value, the inverse of `decode_field`."""
    ext = ext_of(field, value)
    if field == "image":
        ext = image_format
    if isinstance(value, bytes):
        return ext, value
    if field == "label" or ext.endswith(".cls"):
        return ext, str(int(value)).encode()
    if isinstance(value, str):
        return ext, value.encode("utf-8")
    if ext.endswith(".pth"):
        import torch

        buf = io.BytesIO()
        torch.save(value, buf)
        return ext, buf.getvalue()
    if field == "meta" or isinstance(value, dict):
        return ext, json.dumps(value).encode("utf-8")
    if field == "mask" and isinstance(value, np.ndarray):
        value = Image.fromarray(value.astype(np.uint8))
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        fmt = _PIL_FORMATS[ext.rsplit(".", 1)[-1]][0]
        value.save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
        return ext, buf.getvalue()
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return ext, buf.getvalue()
    raise TypeError(f"cannot encode field {field!r} of type {type(value).__name__}")
