"""The transforms every recipe and eval applies to samples, built from a model's `pretrained_cfg`.

    t = eval_transform(model)                       # resize, center crop, normalise (timm convention)
    t = train_transform(model, scale=(0.2, 1.0))    # random resized crop, flip, optional jitter
    views = MultiCrop(model, n_local=6)(image)      # DINO: 2 global + 6 local views
    out = PairedTransform(model)(sample)            # image + mask (+ thermal, depth) cropped together
    loader(..., transform=SampleTransform(image=t)) # per-field transforms on sample dicts; the loader
                                                    # runs t's dtype/normalise tail once per batch

Everything random draws from torch's global RNG (torchvision v2 does), which the loader seeds per
worker, so `torch.manual_seed(s)` fixes every view.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from zoo.errors import ConfigError, SampleError
from zoo.registry import close_matches

# "nearest" means pixel-centre aligned nearest (PIL's, and torch's nearest-exact): it lines up with
# bilinear/bicubic, where torch's legacy "nearest" is shifted by half a pixel.
INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST_EXACT,
    "nearest-exact": v2.InterpolationMode.NEAREST_EXACT,
}
_MASK_INTERPOLATION = v2.InterpolationMode.NEAREST_EXACT
_DEFAULTS = {"interpolation": "bicubic", "crop_pct": 0.875}  # timm's, for cfgs that leave them out


# -- the model's preprocessing -------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """A validated `pretrained_cfg`: what a model expects its inputs to look like."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]


def data_config(cfg: Mapping[str, Any] | Any) -> DataConfig:
    """Validate a `pretrained_cfg` dict (or a model's `.pretrained_cfg`) into a `DataConfig`.

    Needs `input_size` (C, H, W), `mean`, `std`; `interpolation` and `crop_pct` default as in timm.
    """
    if isinstance(cfg, DataConfig):
        return cfg
    raw = cfg if isinstance(cfg, Mapping) else getattr(cfg, "pretrained_cfg", None)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"expected a pretrained_cfg dict or a model with a .pretrained_cfg dict, got {type(cfg).__name__}"
        )
    missing = [k for k in ("input_size", "mean", "std") if raw.get(k) is None]
    if missing:
        raise ConfigError(
            f"pretrained_cfg is missing {', '.join(map(repr, missing))}: it needs input_size (C, H, W), mean and "
            f"std (optional: interpolation, crop_pct); got keys {sorted(raw)}"
        )
    size = raw["input_size"]
    if not (_is_seq(size) and len(size) == 3 and all(_is_int(v) and v > 0 for v in size)):
        raise ConfigError(f"pretrained_cfg input_size must be (C, H, W) positive ints, got {size!r}")
    c = int(size[0])
    stats = {}
    for key in ("mean", "std"):
        val = raw[key]
        if not (_is_seq(val) and len(val) == c and all(_is_real(v) for v in val)):
            raise ConfigError(f"pretrained_cfg {key} must be {c} numbers (one per channel of input_size), got {val!r}")
        stats[key] = tuple(float(v) for v in val)
    if any(s <= 0 for s in stats["std"]):
        raise ConfigError(f"pretrained_cfg std must be positive, got {stats['std']}")
    interp = raw.get("interpolation") or _DEFAULTS["interpolation"]
    interp = interp.value if isinstance(interp, v2.InterpolationMode) else interp
    _interpolation(interp, "pretrained_cfg interpolation")
    crop_pct = raw.get("crop_pct")
    crop_pct = _DEFAULTS["crop_pct"] if crop_pct is None else crop_pct
    _check_crop_pct(crop_pct, "pretrained_cfg crop_pct")
    return DataConfig(tuple(int(v) for v in size), stats["mean"], stats["std"], str(interp), float(crop_pct))


def _is_seq(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _interpolation(name: Any, what: str = "interpolation") -> v2.InterpolationMode:
    if isinstance(name, v2.InterpolationMode):
        return name
    if name not in INTERPOLATIONS:
        close = close_matches(str(name), list(INTERPOLATIONS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{what} {name!r} is not one of {sorted(INTERPOLATIONS)}{hint}")
    return INTERPOLATIONS[name]


def _check_crop_pct(crop_pct: Any, what: str = "crop_pct") -> None:
    if not (_is_real(crop_pct) and 0 < crop_pct <= 1):
        raise ConfigError(f"{what} must be in (0, 1] (the fraction of the resized image kept), got {crop_pct!r}")


def _range(v: Any, what: str, upper: float | None = None) -> tuple[float, float]:
    if not (_is_seq(v) and len(v) == 2 and all(_is_real(x) for x in v) and 0 < v[0] <= v[1]):
        raise ConfigError(f"{what} must be (low, high) with 0 < low <= high, got {v!r}")
    if upper is not None and v[1] > upper:
        raise ConfigError(f"{what} must not exceed {upper}, got {v!r}")
    return float(v[0]), float(v[1])


def _prob(p: Any, what: str) -> float:
    if not (_is_real(p) and 0 <= p <= 1):
        raise ConfigError(f"{what} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _hw(size: Any, what: str) -> tuple[int, int]:
    if _is_int(size) and size > 0:
        return int(size), int(size)
    if _is_seq(size) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    raise ConfigError(f"{what} must be a positive int or (height, width), got {size!r}")


# -- geometric ops that resample masks pixel-centre aligned --------------------------------------
# torchvision resamples a Mask with its legacy "nearest" (half a pixel off the image's bilinear or
# bicubic grid) and ignores the interpolation given; these use nearest-exact so masks stay aligned.
class _RandomResizedCrop(v2.RandomResizedCrop):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            out = F.crop_mask(inpt.as_subclass(torch.Tensor), **params)
            return tv_tensors.wrap(F.resize_mask(out, self.size, interpolation=_MASK_INTERPOLATION), like=inpt)
        return super().transform(inpt, params)


class _Resize(v2.Resize):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            out = F.resize_mask(inpt.as_subclass(torch.Tensor), self.size, interpolation=_MASK_INTERPOLATION)
            return tv_tensors.wrap(out, like=inpt)
        return super().transform(inpt, params)


def _channels(c: int) -> list[v2.Transform]:
    """Convert a grey image for an RGB model (and the reverse); a no-op for the usual case."""
    return [v2.RGB()] if c == 3 else [v2.Grayscale(1)] if c == 1 else []


def _to_normalized(dc: DataConfig) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(dc.mean, dc.std), v2.ToPureTensor()]


def _eval_geometry(dc: DataConfig, crop_pct: float, interp: v2.InterpolationMode) -> list[v2.Transform]:
    h, w = dc.size
    # timm: the shorter side goes to floor(size / crop_pct), never below the crop itself.
    rh, rw = max(h, int(h / crop_pct)), max(w, int(w / crop_pct))
    resize: int | tuple[int, int] = rh if h == w else (rh, rw)
    return [_Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop((h, w))]


def _photometric(
    color_jitter: float | Sequence[float], color_jitter_p: float, grayscale: float, blur: float, solarize: float,
    size: tuple[int, int],
) -> list[v2.Transform]:
    """Photometric ops on a PIL or uint8 image, in DINO's order (jitter, grey, blur, solarize)."""
    ops: list[v2.Transform] = []
    if _is_real(color_jitter) and color_jitter >= 0:
        jitter = (float(color_jitter),) * 3 + (0.0,) if color_jitter > 0 else None
    elif _is_seq(color_jitter) and len(color_jitter) in (3, 4) and all(_is_real(v) and v >= 0 for v in color_jitter):
        jitter = tuple(float(v) for v in color_jitter) + (0.0,) * (4 - len(color_jitter))
    else:
        raise ConfigError(
            f"color_jitter must be a number >= 0 or (brightness, contrast, saturation[, hue]), got {color_jitter!r}"
        )
    if jitter is not None and any(jitter) and _prob(color_jitter_p, "color_jitter_p") > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(*jitter)], p=color_jitter_p))
    if _prob(grayscale, "grayscale") > 0:
        ops.append(v2.RandomGrayscale(p=grayscale))
    if _prob(blur, "blur") > 0:
        kernel = min(9, 2 * min(size) - 1)  # DINOv2's kernel for sigma in (0.1, 2); odd, fits the image
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
    if _prob(solarize, "solarize") > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize))
    return ops


# -- image transforms ----------------------------------------------------------------------------
def eval_transform(
    cfg: Mapping[str, Any] | Any, *, crop_pct: float | None = None, interpolation: str | None = None
) -> v2.Compose:
    """Resize the shorter side to int(size / crop_pct), center crop to size, to float, normalise.

    Takes a PIL image or a uint8 tensor C×H×W; returns a float tensor of the model's input_size.
    """
    dc = data_config(cfg)
    crop_pct = dc.crop_pct if crop_pct is None else crop_pct
    _check_crop_pct(crop_pct)
    interp = _interpolation(interpolation or dc.interpolation)
    return v2.Compose([*_channels(dc.input_size[0]), *_eval_geometry(dc, crop_pct, interp), *_to_normalized(dc)])


def train_transform(
    cfg: Mapping[str, Any] | Any,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | Sequence[float] = 0.0,
    color_jitter_p: float = 1.0,
    grayscale: float = 0.0,
    blur: float = 0.0,
    solarize: float = 0.0,
    interpolation: str | None = None,
    size: int | tuple[int, int] | None = None,
) -> v2.Compose:
    """RandomResizedCrop(size, scale, ratio), horizontal flip, optional photometric ops, normalise.

    `color_jitter` s means brightness = contrast = saturation = s (timm), or give all four with hue;
    it applies with probability `color_jitter_p`; `grayscale`, `blur`, `solarize` are probabilities.
    `size` overrides the cfg's input size. Input: PIL image or uint8 tensor; output: float tensor.
    """
    dc = data_config(cfg)
    hw = dc.size if size is None else _hw(size, "size")
    ops: list[v2.Transform] = [
        *_channels(dc.input_size[0]),
        _RandomResizedCrop(
            hw,
            scale=_range(scale, "scale", upper=1.0),
            ratio=_range(ratio, "ratio"),
            interpolation=_interpolation(interpolation or dc.interpolation),
            antialias=True,
        ),
    ]
    if _prob(hflip, "hflip") > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    ops += _photometric(color_jitter, color_jitter_p, grayscale, blur, solarize, hw)
    return v2.Compose(ops + _to_normalized(dc))


def _model_patch_size(cfg: Any) -> int | None:
    ps = getattr(getattr(cfg, "patch_embed", None), "patch_size", None)
    if _is_seq(ps):
        ps = ps[0]
    return int(ps) if _is_int(ps) else None


def _local_side(global_side: int, patch: int) -> int:
    """About 3/7 of the global side (224 -> 96), a multiple of the patch size, at least 8 px."""
    side = max(1, round(global_side * 3 / 7 / patch)) * patch
    while side < 8:
        side += patch
    return side


class MultiCrop:
    """DINO multi-crop: `n_global` large views then `n_local` small views of one image.

    Sizes default to the cfg's input size and about 3/7 of it (a multiple of `patch_size`, inferred
    when `cfg` is a ViT). Photometric defaults are DINO's: jitter (0.4, 0.4, 0.2, 0.1) with p=0.8,
    grey p=0.2; `blur` and `solarize` are probabilities for (first global, other globals, locals).
    Pass color_jitter=0, grayscale=0, blur=(0, 0, 0), solarize=(0, 0, 0) for crops and flips only.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any] | Any,
        n_global: int = 2,
        n_local: int = 6,
        global_size: int | tuple[int, int] | None = None,
        local_size: int | tuple[int, int] | None = None,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        *,
        patch_size: int | None = None,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale: float = 0.2,
        blur: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize: tuple[float, float, float] = (0.0, 0.2, 0.0),
        interpolation: str | None = None,
    ):
        dc = data_config(cfg)
        if not (_is_int(n_global) and n_global >= 1 and _is_int(n_local) and n_local >= 0):
            raise ConfigError(f"MultiCrop needs n_global >= 1 and n_local >= 0, got {n_global!r}, {n_local!r}")
        for name, probs in (("blur", blur), ("solarize", solarize)):
            if not (_is_seq(probs) and len(probs) == 3):
                raise ConfigError(f"MultiCrop {name} must be 3 probabilities (first global, other globals, locals)")
        patch = patch_size if patch_size is not None else _model_patch_size(cfg)
        if patch is not None and not (_is_int(patch) and patch > 0):
            raise ConfigError(f"patch_size must be a positive int, got {patch!r}")
        self.global_size = dc.size if global_size is None else _hw(global_size, "global_size")
        if local_size is None:
            self.local_size = tuple(_local_side(s, patch or 1) for s in self.global_size)
        else:
            self.local_size = _hw(local_size, "local_size")
        if patch:
            for what, hw in (("global_size", self.global_size), ("local_size", self.local_size)):
                if hw[0] % patch or hw[1] % patch:
                    raise ConfigError(f"MultiCrop {what} {hw} is not divisible by the patch size {patch}")
        common = dict(ratio=ratio, hflip=hflip, color_jitter=color_jitter, color_jitter_p=color_jitter_p,
                      grayscale=grayscale, interpolation=interpolation)
        self.views: list[v2.Compose] = [
            train_transform(dc, size=self.global_size, scale=global_scale, blur=blur[min(i, 1)],
                            solarize=solarize[min(i, 1)], **common)
            for i in range(n_global)
        ]
        local = train_transform(
            dc, size=self.local_size, scale=local_scale, blur=blur[2], solarize=solarize[2], **common
        )
        self.views += [local] * n_local
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        return [view(image) for view in self.views]

    def __repr__(self) -> str:
        return (f"MultiCrop(n_global={self.n_global} @ {self.global_size}, "
                f"n_local={self.n_local} @ {self.local_size})")


# -- image + per-pixel targets -------------------------------------------------------------------
class PairedTransform:
    """Crop, resize and flip an image, its mask and other per-pixel modalities identically.

    Masks resample nearest (pixel-centre aligned); photometric ops and normalisation touch only the
    image. Returns the sample with "image" a normalised float tensor, "mask" a LongTensor H×W, and
    each modality a float tensor C×H×W (uint8 scaled to [0, 1]); other fields pass through.
    `modalities=None` takes every other field holding a PIL image (thermal, depth, ...); absent
    ones are skipped. Eval (`train=False`) uses eval_transform's resize and center crop.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any] | Any,
        train: bool = True,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] = 0.0,
        color_jitter_p: float = 1.0,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        modalities: Sequence[str] | None = None,
        mask_field: str = "mask",
    ):
        dc = data_config(cfg)
        interp = _interpolation(interpolation or dc.interpolation)
        if train:
            geometry: list[v2.Transform] = [
                _RandomResizedCrop(dc.size, scale=_range(scale, "scale", upper=1.0), ratio=_range(ratio, "ratio"),
                                   interpolation=interp, antialias=True)
            ]
            if _prob(hflip, "hflip") > 0:
                geometry.append(v2.RandomHorizontalFlip(p=hflip))
            photometric = _photometric(color_jitter, color_jitter_p, 0.0, 0.0, 0.0, dc.size)
        else:
            crop_pct = dc.crop_pct if crop_pct is None else crop_pct
            _check_crop_pct(crop_pct)
            geometry, photometric = _eval_geometry(dc, crop_pct, interp), []
        self.train = train
        self.channels = v2.Compose(_channels(dc.input_size[0]))
        self.geometry = v2.Compose(geometry)
        self.image_tail = v2.Compose(photometric + _to_normalized(dc))
        self.modality_tail = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])
        self.modalities = None if modalities is None else tuple(modalities)
        self.mask_field = mask_field

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if "image" not in sample:
            raise SampleError(f"PairedTransform needs an 'image' field; the sample has {sorted(sample)}")
        names = self.modalities
        if names is None:
            skip = ("image", self.mask_field)
            names = tuple(k for k, v in sample.items() if isinstance(v, Image.Image) and k not in skip)
        group: dict[str, Any] = {"image": self.channels(F.to_image(sample["image"]))}
        for name in names:
            if sample.get(name) is not None:
                group[name] = _modality(sample[name], name)
        if sample.get(self.mask_field) is not None:
            group[self.mask_field] = _mask(sample[self.mask_field])
        sizes = {k: tuple(v.shape[-2:]) for k, v in group.items()}
        if len(set(sizes.values())) > 1:
            raise SampleError(f"per-pixel fields differ in size (H, W): {sizes}; they must match to crop together")
        group = self.geometry(group)
        out = dict(sample)
        out["image"] = self.image_tail(group.pop("image"))
        if self.mask_field in group:
            out[self.mask_field] = group.pop(self.mask_field).as_subclass(torch.Tensor).long()
        for name, value in group.items():
            out[name] = self.modality_tail(value)
        return out

    def __repr__(self) -> str:
        return f"PairedTransform(train={self.train}, geometry={self.geometry}, image={self.image_tail})"


def _mask(value: Any) -> tv_tensors.Mask:
    m = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise SampleError(f"a mask must be H×W class indices, got shape {tuple(m.shape)}")
    if m.dtype != torch.uint8:
        m = m.to(torch.float32)  # nearest resampling needs uint8 or float; float is exact below 2**24
    return tv_tensors.Mask(m)


def _modality(value: Any, name: str) -> tv_tensors.Image:
    try:
        img = F.to_image(value)
    except TypeError as e:
        raise SampleError(f"field {name!r} is not an image (PIL, array or tensor): {e}") from None
    if img.dtype != torch.uint8 and not img.is_floating_point():
        img = F.to_dtype(img, torch.float32, scale=True)  # e.g. 16-bit depth; resampling needs float
    return img


# -- captions ------------------------------------------------------------------------------------
def _uniform(rng: random.Random | np.random.Generator | torch.Generator | None) -> float:
    if rng is None:
        return float(torch.rand(()))
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng))
    return float(rng.random())


def named_captions(sample: Mapping[str, Any], name: str) -> list[str]:
    """The non-empty captions called `name`: a top-level text field ("caption" is the `txt` member),
    else `meta["captions"][name]`; a list contributes all its entries."""
    value = sample.get(name)
    if not isinstance(value, str):
        meta = sample.get("meta")
        captions = meta.get("captions") if isinstance(meta, Mapping) else None
        value = captions.get(name) if isinstance(captions, Mapping) else None
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    return [v for v in values if isinstance(v, str) and v.strip()]


def choose_caption(
    sample: Mapping[str, Any],
    probabilities: Mapping[str, float],
    rng: random.Random | np.random.Generator | torch.Generator | None = None,
) -> tuple[str, str]:
    """Pick one caption by name with the given probabilities, renormalised over those present.

    A caption `name` is the sample's top-level text field of that name ("caption" is the `txt`
    member) or `meta["captions"][name]`; a list there is picked from uniformly (DataCompDR's
    synthetic captions). `rng=None` uses torch's global RNG, which the loader seeds per worker.
    Returns (name, text).
    """
    if not isinstance(probabilities, Mapping) or not probabilities:
        raise ConfigError(f"caption probabilities must be a non-empty {{name: probability}} dict, got {probabilities}")
    for name, p in probabilities.items():
        if not (_is_real(p) and p >= 0):
            raise ConfigError(f"caption probability for {name!r} must be a finite number >= 0, got {p!r}")
    present = {n: c for n in probabilities if probabilities[n] > 0 and (c := named_captions(sample, n))}
    total = sum(probabilities[n] for n in present)
    if not present:
        meta = sample.get("meta")
        captions = meta.get("captions") if isinstance(meta, Mapping) else None
        in_meta = sorted(captions) if isinstance(captions, Mapping) else []
        raise SampleError(
            f"sample {sample.get('__key__', '')!r} has none of the captions {sorted(probabilities)} (with p > 0); "
            f"it has fields {sorted(k for k in sample if not k.startswith('__'))} and meta captions {in_meta}. "
            "Give probabilities for captions the shards contain, or filter samples without them."
        )
    u = _uniform(rng) * total
    names = list(present)
    chosen = names[-1]
    for name in names:
        u -= probabilities[name]
        if u < 0:
            chosen = name
            break
    texts = present[chosen]
    text = texts[0] if len(texts) == 1 else texts[min(int(_uniform(rng) * len(texts)), len(texts) - 1)]
    return chosen, text


# -- per-batch work ------------------------------------------------------------------------------
# Elementwise ops without randomness: on a collated B×C×H×W batch they give the values they give on
# each image, so the loader runs them once per batch (timm's fast-collate idea).
_BATCHABLE = (v2.ToDtype, v2.ConvertImageDtype, v2.Normalize, v2.ToPureTensor)
_TO_TENSOR = (v2.PILToTensor, v2.ToImage)


def split_batchable(transform: Callable[[Any], Any]) -> tuple[Callable[[Any], Any], v2.Compose | None]:
    """(per-image part, per-batch part) of a v2.Compose whose tail converts dtype and normalises.

    The head ends on a uint8 tensor (it must hold a PILToTensor/ToImage), so batches collate and
    cross processes at a quarter of float32's bytes; the tail then runs once per batch, and the
    batch equals the one the whole transform per image gives. (transform, None) when nothing splits.
    """
    if not isinstance(transform, v2.Compose):
        return transform, None
    ops = list(transform.transforms)
    cut = len(ops)
    while cut and type(ops[cut - 1]) in _BATCHABLE:
        cut -= 1
    if cut == len(ops) or not any(isinstance(op, _TO_TENSOR) for op in ops[:cut]):
        return transform, None
    return v2.Compose(ops[:cut]), v2.Compose(ops[cut:])


# -- sample glue ---------------------------------------------------------------------------------
class SampleTransform:
    """Apply a transform to some fields of a sample dict; every other field passes through.

    `SampleTransform(image=eval_transform(model), thermal=t)`; fields absent from a sample are
    skipped (the loader's `fields=` already requires what must be there).
    """

    def __init__(self, image: Callable[[Any], Any] | None = None, **fields: Callable[[Any], Any]):
        self.fields = {k: t for k, t in {"image": image, **fields}.items() if t is not None}

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        for name, transform in self.fields.items():
            if name in out:
                out[name] = transform(out[name])
        return out

    def split(self) -> tuple["SampleTransform", "SampleTransform | None"]:
        """(per-sample, per-batch) SampleTransforms: each field's `split_batchable` parts. The per-batch
        one applies to a collated batch dict; None when no field's transform splits."""
        parts = {name: split_batchable(t) for name, t in self.fields.items()}
        tails = {name: tail for name, (_, tail) in parts.items() if tail is not None}
        if not tails:
            return self, None
        return SampleTransform(**{name: head for name, (head, _) in parts.items()}), SampleTransform(**tails)

    def __repr__(self) -> str:
        return f"SampleTransform({', '.join(f'{k}={t!r}' for k, t in self.fields.items())})"


__all__ = [
    "DataConfig",
    "data_config",
    "eval_transform",
    "train_transform",
    "MultiCrop",
    "PairedTransform",
    "choose_caption",
    "named_captions",
    "SampleTransform",
    "split_batchable",
    "SampleError",
    "INTERPOLATIONS",
]
