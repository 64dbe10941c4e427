"""Medical MAE: MAE pretraining on chest X-rays (Xiao et al., WACV 2023, "Delving into Masked Autoencoders for
Multi-Label Thorax Disease Classification", arXiv:2210.12843), as in lambert-x/medical_mae `models_mae.py`,
`main_pretrain_multi_datasets_xray.py`, `PRETRAIN.md` (facts: specs/mae.md §3(a)).

The model is MAE's (recipes/mae.py); only the settings differ, so this subclass only changes defaults:

- mask ratio 0.90 (10% of the patches visible: int(N * 0.1) kept);
- RandomResizedCrop with scale (0.5, 1.0), bicubic, plus horizontal flip (MAE: 0.2-1);
- norm_pix_loss off (the paper's pretraining command does not set it);
- grey input: in_chans=1 by default, the sample's image converted to grey ("L", by the default transform, which
  follows the encoder's channel count), normalised with NIH ChestX-ray14's statistics 0.5056 / 0.252;
- decoder presets are MAE's constructor arguments: `mae_vit_small_patch16_dec512d2b` (the paper's ViT-S) is
  decoder_dim 512, decoder_depth 2, decoder_heads 16 (recipes/medical_mae_vit_small_patch16_224.yaml); ViT-B uses
  MAE's 512-d 8-block decoder, the default here.

Choices the paper leaves open, made here: the official code loads X-rays as RGB (3 identical channels) with the
NIH mean/std on each; here the default is one grey channel (a third of the patch-embedding input, the same
information). `in_chans=3` gives the paper's exact RGB input: the NIH statistics are then repeated per channel
unless `mean` / `std` are given, which must have one value per channel (a single grey value for 3 channels is a
ConfigError). CheXpert and MIMIC use ImageNet statistics officially: pass `mean` / `std` for those.
The exported encoder is a plain zoo ViT whose pretrained_cfg says input_size (1, H, W): `zoo.eval` (kNN, linear
probe) converts RGB images to grey for it through the eval transform.

Registered as `RECIPES["medical_mae"]`; the CPU recipe is `medical_mae_vit_tiny_patch4_32_digits` (the built-in
digits rendered grey: real scans are not generated here).
"""

from __future__ import annotations

from typing import Any, Sequence

from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec
from zoo.recipes.mae import MAE
from zoo.registry import RECIPES

NIH_MEAN, NIH_STD = 0.5056, 0.252  # NIH ChestX-ray14 pixel statistics (the paper's, for its NIH pretraining)


def per_channel(value: float | Sequence[float] | None, default: float, in_chans: int, what: str,
                recipe: str = "medical_mae") -> tuple[float, ...]:
    """`value` as one number per input channel: None -> `default` on every channel; a sequence must have
    exactly `in_chans` values (a ConfigError otherwise, saying what to give)."""
    if value is None:
        return (float(default),) * in_chans
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if len(values) != in_chans:
        raise ConfigError(f"{recipe}: {what} {list(values)} has {len(values)} value(s) for in_chans={in_chans}; give "
                          f"one per channel (e.g. in_chans=1 with one grey value, or 3 values for RGB X-rays), "
                          f"or leave {what} out for NIH's {default} on every channel")
    return tuple(float(v) for v in values)


class MedicalMAE(MAE):
    """MAE with the chest X-ray paper's settings: grey input, mask 0.9, crop scale 0.5-1, NIH normalisation."""

    recipe = "medical_mae"

    def __init__(
        self,
        arch: str,
        mask_ratio: float = 0.90,
        norm_pix_loss: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        in_chans: int = 1,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        **arch_overrides: Any,
    ):
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ConfigError(f"{self.recipe}: in_chans must be a positive int (1 for grey X-rays), got {in_chans!r}")
        crop_scale = tuple(crop_scale)
        if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ConfigError(f"{self.recipe}: crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        super().__init__(arch, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, decoder_dim=decoder_dim,
                         decoder_depth=decoder_depth, decoder_heads=decoder_heads, decoder_mlp_ratio=decoder_mlp_ratio,
                         in_chans=in_chans, mean=per_channel(mean, NIH_MEAN, in_chans, "mean"),
                         std=per_channel(std, NIH_STD, in_chans, "std"), **arch_overrides)
        self.crop_scale = tuple(float(v) for v in crop_scale)

    def data_spec(self) -> DataSpec:
        # The default transform converts the image to the encoder's channel count (grey "L" for in_chans=1).
        return DataSpec(fields=("image",),
                        train_transform={"scale": self.crop_scale, "hflip": 0.5, "interpolation": "bicubic"})


RECIPES.register(
    "medical_mae",
    MedicalMAE,
    family="mae",
    paper="arXiv:2210.12843",
    cpu_recipe="medical_mae_vit_tiny_patch4_32_digits",
    description="Medical MAE (chest X-rays): MAE on grey images with mask 0.9, crop scale 0.5-1 and NIH "
                "normalisation, no norm-pix",
)

__all__ = ["MedicalMAE", "per_channel", "NIH_MEAN", "NIH_STD"]
