"""SatMAE++: multi-scale MAE pretraining (Noman et al., CVPR 2024, arXiv:2403.05419), as in techmn/satmae_pp
`models_mae.py`, `models_mae_group_channels.py`, `engine_pretrain.py`, `util/datasets.py` (facts: specs/mae.md §3(b)).

What differs from MAE (recipes/mae.py), and nothing else does:

- The data: each sample is random-resized-cropped at the TOP scale, i.e. `scales[-1]` times the encoder's input
  (fMoW-RGB: 2 x 224 with crop scale 0.2-1; Sentinel: 4 x 96 with 0.6-1), flipped and normalised; the lower scales
  are made from it with bilinear `interpolate(scale_factor=0.5)`, once per scale. The encoder sees the lowest.
  A batch holds `image` (the lowest) and `image_2x` (and `image_4x`): `multiscale_images`, `MultiScaleTransform`.
- A `MultiScaleHead` after the standard decoder: the decoder's per-patch prediction un-patchified to an image of
  the input's resolution -> 1x1 conv C -> 4C (`proj_ratio` 4) -> GELU -> channels-first LayerNorm -> one
  `UpsampleBlock` per scale: ConvTranspose2d(4C, 4C, k4, s2, p1) (2x) -> LN -> LeakyReLU -> residual block
  (conv3x3, ReLU, conv3x3, x0.5, + skip) -> LN -> `proj_out` conv3x3 4C -> C. A block returns its 4C features
  (the next block's input) and its C-channel image, so a second block gives 4x.
- The loss: MAE's masked MSE at the input scale plus the L1 over the WHOLE upsampled image (every pixel, masked
  or not) against the real image at that scale (`upsampled_l1`):
  RGB (scales (2,)) 0.6 * MSE + 0.4 * L1_2x; Sentinel (2, 4) 0.6 * MSE + 0.4 * (0.5 * L1_2x + 0.5 * L1_4x).
  These are `rec_weight`, `multiscale_weight` and `scale_weights` (default: equal shares), through the core's
  `extra_losses` and `loss_weights` ({"rec": 0.6, "l1_2x": 0.2, "l1_4x": 0.2}). norm_pix_loss is off by default,
  as in SatMAE++; with it on, the head still upsamples the raw prediction (as officially).
- Multi-spectral input: `channels` names the sample fields stacked into one C-channel image: `image` is RGB
  (3 channels, as zoo decodes it), every other field is rendered grey ("L", 1 channel); e.g.
  ["image", "thermal", "depth"] on the built-in scenes is 3 + 1 + 1 = 5 channels. The encoder is built with
  in_chans=C, the decoder and the head predict C channels. Per-channel mean/std go into the encoder's
  pretrained_cfg: `image` takes the ViT's own (ImageNet), a grey field 0.5 / 0.25 (a fixed choice, not
  measured: about the middle and spread of an 8-bit rendering); give `mean` / `std` (C values) to set them.
  The export is that encoder, a plain zoo ViT with in_chans=C.

Choices the official code leaves open, made here: the crop runs on float pixels in [0, 1] (SatMAE++ normalises
first, then crops; the resampling is linear, so the order only moves out-of-range bicubic overshoot), with
antialiasing; RGB SatMAE++ fixes 2 scales and Sentinel 3 (model input, 2x, 4x), here `scales` is (2,), (2, 4),
(2, 4, 8)...; the group-channel tokenizer of the Sentinel model (per-group patch embeddings) is not part of this
recipe: multi-spectral input goes through one patch embedding over all C channels (SatMAE++'s RGB model with
in_chans=C). A training image smaller than the top scale's crop (input x scales[-1]) is refused rather than
upsampled into a fake high-resolution target.

Registered as `RECIPES["satmae"]`; the CPU recipe is `satmae_vit_tiny_patch4_32_scenes` (32-px encoder, 64-px
targets), the multi-spectral one `satmae_vit_tiny_patch4_32_scenes_multispectral`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from zoo.errors import ConfigError, SampleError
from zoo.models.vit import IMAGENET_MEAN, IMAGENET_STD
from zoo.recipes.base import DataSpec
from zoo.recipes.mae import MAE, MaskedOutput, unpatchify
from zoo.registry import MODELS, RECIPES

GREY_MEAN, GREY_STD = 0.5, 0.25  # a grey field's default normalisation (a fixed choice, see the docstring)
LN_EPS = 1e-6


# -- pure pieces -------------------------------------------------------------------------------
def check_scales(scales: Sequence[int] | int, recipe: str = "satmae") -> tuple[int, ...]:
    """`scales` as a tuple, or a one-line ConfigError: each UpsampleBlock doubles the resolution, so the
    reachable scales are 2, 4, 8, ... in order, starting at 2."""
    if isinstance(scales, int):
        scales = (scales,)
    out = tuple(scales) if isinstance(scales, (list, tuple)) else ()
    if not out or any(not isinstance(s, int) or isinstance(s, bool) for s in out) \
            or out != tuple(2 ** (i + 1) for i in range(len(out))):
        raise ConfigError(f"{recipe}: scales {scales!r} are not reachable: each upsample block doubles the "
                          "resolution, so scales must be 2, 4, 8, ... in order, each the double of the previous "
                          "(e.g. [2] for RGB, [2, 4] for Sentinel)")
    return out


def field_channels(field: str) -> int:
    """Channels a sample field adds to the stacked input: `image` is RGB (3), any other field is grey (1)."""
    return 3 if field == "image" else 1


def default_normalisation(channels: Sequence[str], rgb_mean: Sequence[float],
                          rgb_std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the stacked input: `image` the ViT's RGB statistics, a grey field 0.5 / 0.25."""
    mean: list[float] = []
    std: list[float] = []
    for field in channels:
        if field == "image":
            mean += [float(v) for v in rgb_mean]
            std += [float(v) for v in rgb_std]
        else:
            mean.append(GREY_MEAN)
            std.append(GREY_STD)
    return tuple(mean), tuple(std)


def stack_fields(sample: dict[str, Any], channels: Sequence[str]) -> torch.Tensor:
    """The sample's `channels` fields as one uint8 (C, H, W) tensor: `image` as RGB, every other field grey ("L")."""
    parts = []
    for field in channels:
        value = sample.get(field)
        if not isinstance(value, Image.Image):
            raise SampleError(f"satmae: field {field!r} of sample {sample.get('__key__', '')!r} is "
                              f"{type(value).__name__}, not an image; channels must name image fields")
        mode = "RGB" if field == "image" else "L"
        parts.append(TF.pil_to_tensor(value if value.mode == mode else value.convert(mode)))
    sizes = {f: tuple(p.shape[-2:]) for f, p in zip(channels, parts)}
    if len(set(sizes.values())) > 1:
        raise SampleError(f"satmae: the channel fields differ in size (H, W): {sizes}; they must match to stack")
    return torch.cat(parts)


def multiscale_images(top: torch.Tensor, scales: Sequence[int]) -> dict[str, torch.Tensor]:
    """A (C, H, W) or (B, C, H, W) image at the top scale -> {"image_{s}x": ..., "image": the lowest}: each scale
    below made from the one above by bilinear `interpolate(scale_factor=0.5)`, as SatMAE++'s datasets."""
    batched = top.ndim == 4
    x = top if batched else top.unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    for s in sorted(scales, reverse=True):
        out[f"image_{s}x"] = x
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear")
    out["image"] = x
    return out if batched else {k: v.squeeze(0) for k, v in out.items()}


def upsampled_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over EVERY pixel and channel of the upsampled image (SatMAE++'s `F.l1_loss`), in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"upsampled prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return F.l1_loss(pred.float(), target.float())


# -- the multi-scale head ------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (SatMAE++'s `LayerNorm(data_format="channels_first")`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, scaled by 0.5, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.relu(self.conv1(x)))


class UpsampleBlock(nn.Module):
    """2x: ConvTranspose2d(k4, s2, p1) -> LN -> LeakyReLU -> residual block -> LN; returns (features (B, dim, 2H, 2W),
    image (B, out_chans, 2H, 2W) by `proj_out`, a conv3x3)."""

    def __init__(self, dim: int, out_chans: int):
        super().__init__()
        self.up_conv = nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1)
        self.up_norm = LayerNorm2d(dim, eps=LN_EPS)
        self.res_block = ResidualBlock(dim)
        self.res_norm = LayerNorm2d(dim, eps=LN_EPS)
        self.proj_out = nn.Conv2d(dim, out_chans, 3, padding=1)
        for m in self.modules():  # SatMAE++: Conv2d xavier weights, zero bias (the transposed conv keeps its default)
            if type(m) is nn.Conv2d:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.up_norm(self.up_conv(x)))
        x = self.res_norm(self.res_block(x))
        return x, self.proj_out(x)


class MultiScaleHead(nn.Module):
    """An input-resolution C-channel image -> one C-channel image per scale (2x, 4x, ...): 1x1 conv C -> proj_ratio*C,
    GELU, channels-first LN, then a chain of `UpsampleBlock`s, each fed the previous block's features."""

    def __init__(self, in_chans: int, n_scales: int = 1, proj_ratio: int = 4):
        super().__init__()
        dim = in_chans * proj_ratio
        self.proj_up_conv = nn.Conv2d(in_chans, dim, kernel_size=1)
        self.proj_up_norm = LayerNorm2d(dim, eps=LN_EPS)
        self.upsamplers = nn.ModuleList([UpsampleBlock(dim, in_chans) for _ in range(n_scales)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.proj_up_norm(F.gelu(self.proj_up_conv(x)))
        out = []
        for block in self.upsamplers:
            x, image = block(x)
            out.append(image)
        return out


# -- data --------------------------------------------------------------------------------------
class MultiScaleTransform:
    """A sample -> {"image": lowest scale, "image_2x": ..., ...}: the `channels` fields stacked, random-resized-
    cropped at `size * scales[-1]` (bicubic), flipped, normalised per channel, then halved bilinearly per scale."""

    def __init__(self, channels: Sequence[str], size: int, scales: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], crop_scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5):
        self.channels, self.size, self.scales = tuple(channels), int(size), tuple(scales)
        self.top = self.size * self.scales[-1]
        ops: list[v2.Transform] = [v2.RandomResizedCrop(self.top, scale=tuple(crop_scale),
                                                        interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(p=hflip))
        self.geometry = v2.Compose(ops)
        self.normalize = v2.Normalize(list(mean), list(std))

    def check_size(self, h: int, w: int) -> None:
        """A one-line ConfigError for an image too small to crop the top scale from without upsampling it."""
        if min(h, w) < self.top:
            raise ConfigError(
                f"satmae: training images are {w}x{h} px, but scales {list(self.scales)} with a {self.size}-px encoder "
                f"need images of at least {self.top} px (encoder input {self.size} x top scale {self.scales[-1]}): "
                f"write the shards at {self.top} px or more, or lower the top scale or the encoder's img_size")

    def __call__(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        pixels = stack_fields(sample, self.channels)
        self.check_size(*pixels.shape[-2:])
        top = self.normalize(self.geometry(TF.to_dtype(pixels, torch.float32, scale=True)))
        return multiscale_images(top, self.scales)

    def __repr__(self) -> str:
        return f"MultiScaleTransform(channels={self.channels}, top={self.top}, scales={self.scales})"


# -- the method --------------------------------------------------------------------------------
class SatMAE(MAE):
    """SatMAE++ on a zoo ViT: MAE at the lowest scale plus a `MultiScaleHead` scored by L1 at every higher scale."""

    recipe = "satmae"

    def __init__(
        self,
        arch: str,
        scales: tuple[int, ...] = (2,),
        channels: tuple[str, ...] = ("image",),
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        rec_weight: float = 0.6,
        multiscale_weight: float = 0.4,
        scale_weights: tuple[float, ...] | None = None,
        proj_ratio: int = 4,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        **arch_overrides: Any,
    ):
        scales = check_scales(scales, self.recipe)
        if isinstance(channels, str):
            channels = (channels,)
        channels = tuple(channels)
        if not channels or not all(isinstance(c, str) and c for c in channels) or len(set(channels)) != len(channels):
            raise ConfigError(f"{self.recipe}: channels must be distinct sample field names, e.g. ['image'] or "
                              f"['image', 'thermal', 'depth']; got {list(channels)}")
        n_chans = sum(field_channels(f) for f in channels)
        if arch_overrides.get("in_chans", n_chans) != n_chans:
            raise ConfigError(f"{self.recipe}: in_chans={arch_overrides['in_chans']} does not match channels "
                              f"{list(channels)} ({n_chans} channels: image is RGB, other fields grey); drop in_chans")
        defaults = MODELS.get(arch).meta.get("defaults", {})
        mean, std = default_normalisation(channels, defaults.get("mean", IMAGENET_MEAN), defaults.get("std", IMAGENET_STD))
        for key, value in (("mean", mean), ("std", std)):
            given = arch_overrides.get(key, value)
            if len(given) != n_chans:
                raise ConfigError(f"{self.recipe}: {key} has {len(given)} value(s) for the {n_chans} input channels of "
                                  f"{list(channels)}; give one per channel (image: 3, other fields: 1)")
            arch_overrides[key] = tuple(float(v) for v in given)
        if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ConfigError(f"{self.recipe}: crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        weights = (1.0 / len(scales),) * len(scales) if scale_weights is None else tuple(float(w) for w in scale_weights)
        if len(weights) != len(scales):
            raise ConfigError(f"{self.recipe}: scale_weights has {len(weights)} value(s) for scales {list(scales)}; "
                              "give one per scale (SatMAE++: 0.5, 0.5 for [2, 4]) or leave it out for equal shares")
        arch_overrides["in_chans"] = n_chans
        super().__init__(arch, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, decoder_dim=decoder_dim,
                         decoder_depth=decoder_depth, decoder_heads=decoder_heads, decoder_mlp_ratio=decoder_mlp_ratio,
                         **arch_overrides)
        self.scales, self.channels, self.crop_scale = scales, channels, tuple(float(v) for v in crop_scale)
        self.head = MultiScaleHead(n_chans, len(scales), proj_ratio)
        self.loss_weights = {"rec": float(rec_weight),
                             **{f"l1_{s}x": float(multiscale_weight) * w for s, w in zip(scales, weights)}}

    @property
    def input_size(self) -> int:
        return int(self.encoder.pretrained_cfg["input_size"][-1])

    def upsample(self, pred: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """The decoder's per-patch prediction (B, N, p*p*C) -> the head's images, one per scale (B, C, s*H, s*W)."""
        return self.head(unpatchify(pred, self.patch_size, self.in_chans, grid))

    def extra_losses(self, batch: dict[str, Any], x: torch.Tensor, out: MaskedOutput) -> dict[str, torch.Tensor]:
        """L1 over every pixel of each upsampled image against the batch's real image at that scale."""
        return {f"l1_{s}x": upsampled_l1(image, batch[f"image_{s}x"])
                for s, image in zip(self.scales, self.upsample(out.pred, out.grid))}

    def data_spec(self) -> DataSpec:
        cfg = self.encoder.pretrained_cfg
        transform = MultiScaleTransform(self.channels, self.input_size, self.scales, cfg["mean"], cfg["std"],
                                        crop_scale=self.crop_scale)
        return DataSpec(fields=self.channels, transform=transform, prepare=self.check_shards,
                        builtin_size=transform.top)

    def check_shards(self, shards: str, builtin: bool, look: int = 16) -> str:
        """Before training: the channel fields and the image size, read from the first samples of the first shard."""
        from zoo.data.fields import FieldError
        from zoo.data.reader import decode_sample, iter_raw_samples
        from zoo.data.shards import expand_sources

        urls = [u for source in expand_sources(shards) for u in source]
        seen: set[str] = set()
        first = None
        for i, raw in enumerate(iter_raw_samples(urls[:1], Counter())):
            if i >= look:
                break
            try:
                sample = decode_sample(raw, required=(), optional=None)
            except FieldError:
                continue
            seen.update(k for k in sample if not k.startswith("__"))
            if first is None and all(f in sample for f in self.channels):
                first = sample
        missing = [f for f in self.channels if f not in seen]
        if missing:
            raise ConfigError(f"{self.recipe}: channel field {missing[0]!r} is in none of the first samples of "
                              f"{urls[0] if urls else shards} (they have {', '.join(sorted(seen)) or 'nothing'}); "
                              "choose channels among those fields")
        if first is not None:
            pixels = stack_fields(first, self.channels)
            self.data_spec().transform.check_size(*pixels.shape[-2:])
        return shards

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """MAE's reconstruction grid, plus plots/multiscale_{s}x.png: the real image at each scale over the head's."""
        from zoo.engine.plots import image_grid

        paths = super().draw(batch, folder)
        images = batch["image"][:8]
        out = self.forward_masked(images, generator=torch.Generator(device=images.device).manual_seed(0))
        cfg = self.encoder.pretrained_cfg
        for s, image in zip(self.scales, self.upsample(out.pred, out.grid)):
            rows = [batch[f"image_{s}x"][:8], image]
            paths.append(image_grid(rows, folder / f"multiscale_{s}x.png", mean=cfg["mean"], std=cfg["std"],
                                    row_labels=(f"real {s}x", f"head {s}x")))
        return paths


RECIPES.register(
    "satmae",
    SatMAE,
    family="mae",
    paper="arXiv:2403.05419",
    cpu_recipe="satmae_vit_tiny_patch4_32_scenes",
    description="SatMAE++: MAE plus an upsampling head whose 2x (4x) images are scored by L1 against the real "
                "higher-resolution crop; multi-spectral input by stacking fields",
)

__all__ = [
    "SatMAE",
    "MultiScaleHead",
    "UpsampleBlock",
    "ResidualBlock",
    "LayerNorm2d",
    "MultiScaleTransform",
    "check_scales",
    "field_channels",
    "default_normalisation",
    "stack_fields",
    "multiscale_images",
    "upsampled_l1",
]
