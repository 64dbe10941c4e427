"""Class-conditional diffusion transformers (DiT, Peebles & Xie 2023) on diffusers' `DiTTransformer2DModel`.

A zoo DiT IS a diffusers model (`forward(x_t, timestep, class_labels).sample`, `.config`, `.dtype`), so it goes
into a stock `DiTPipeline` as its `transformer` and publishes like every zoo model (its state dict is diffusers',
key for key). Registered at two scales (`DIT_ARCHS`):

- CPU scale, in pixel space: 8 px grey images (the built-in digits at their native 8x8: scikit-learn's real
  handwritten digits), patch 2, 10 classes; a small and a large one for T-Stitch, 13x apart in FLOPs (the paper's DiT-S vs DiT-XL: 23x).
- The paper's sizes (DiT-S/B/L/XL with patch 2) on the 32x32x4 latents of SD's VAE (256 px images), learned
  sigma (8 output channels), 1000 ImageNet classes: `dit_xlarge_patch2_256` loads FAIR's DiT-XL/2.

Two things differ from diffusers' defaults, both settable: (1) diffusers' label embedder drops labels itself
in training mode, independently in every block; a zoo DiT never does (`dropout_prob = 0`, the null-label row
kept): classifier-free-guidance dropout is the recipe's, once per sample. (2) `freq_shift`: diffusers embeds
timesteps with frequencies exp(-ln(1e4) i / (half - 1)), the original DiT with / half; `freq_shift=0` gives
the original's (what `zoo.convert.dit_model` sets, so converted checkpoints compute exactly what DiT did).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from zoo.errors import CheckpointMismatchError, ConfigError
from zoo.registry import MODELS

log = logging.getLogger(__name__)

SD_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of DiT's latents (DiT samples with sd-vae-ft-ema or -mse)
SD_VAE_SCALE = 0.18215

# name -> (width, depth, heads, patch, sample size, in channels, out channels, classes, latent)
DIT_ARCHS: dict[str, dict[str, Any]] = {
    "dit_nano_patch2_8": dict(width=64, depth=4, heads=2, patch=2, size=8, channels=1, out=1, classes=10),
    "dit_tiny_patch2_8": dict(width=192, depth=6, heads=3, patch=2, size=8, channels=1, out=1, classes=10),
    "dit_small_patch2_256": dict(width=384, depth=12, heads=6, patch=2, size=32, channels=4, out=8, classes=1000,
                                 latent=True),
    "dit_base_patch2_256": dict(width=768, depth=12, heads=12, patch=2, size=32, channels=4, out=8, classes=1000,
                                latent=True),
    "dit_large_patch2_256": dict(width=1024, depth=24, heads=16, patch=2, size=32, channels=4, out=8, classes=1000,
                                 latent=True),
    "dit_xlarge_patch2_256": dict(width=1152, depth=28, heads=16, patch=2, size=32, channels=4, out=8, classes=1000,
                                  latent=True),
}
# The structure a checkpoint's diffusers config must share with an arch; the rest may be overridden.
STRUCTURE = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size")


def diffusers_config(arch: str) -> dict[str, Any]:
    """The `DiTTransformer2DModel` arguments of a registered DiT arch."""
    a = DIT_ARCHS[arch]
    return dict(num_attention_heads=a["heads"], attention_head_dim=a["width"] // a["heads"], in_channels=a["channels"],
                out_channels=a["out"], num_layers=a["depth"], sample_size=a["size"], patch_size=a["patch"],
                num_embeds_ada_norm=a["classes"])


def finish_dit(model: nn.Module, *, freq_shift: int = 1, latent: dict[str, Any] | None = None) -> nn.Module:
    """Make a diffusers `DiTTransformer2DModel` a zoo DiT: no label dropout inside the model, the timestep
    frequencies of `freq_shift`, and `pretrained_cfg` / `num_classes` / `null_class` describing its input."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0  # the table keeps its null row (it was built with dropout_prob > 0)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = freq_shift
    cfg = model.config
    c, size = cfg.in_channels, cfg.sample_size
    model.num_classes = cfg.num_embeds_ada_norm
    model.null_class = cfg.num_embeds_ada_norm  # the label that means "no label" (classifier-free guidance)
    model.pretrained_cfg = {
        "input_size": (c, size, size),  # what the model denoises: pixels, or latents when `latent` is set
        "mean": (0.5,) * c, "std": (0.5,) * c,  # pixel models see images in [-1, 1]
        "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": cfg.num_embeds_ada_norm,
        **({"latent": dict(latent)} if latent else {}),
    }
    return model


def _latent(latent: bool, vae: str | None, sample_size: int) -> dict[str, Any] | None:
    """What a latent DiT's samples need decoding with: the VAE (a diffusers repo or folder, `:SUBFOLDER` for a
    pipeline's) and its scaling; None for a pixel DiT."""
    if not latent:
        return None
    return {"vae": vae or SD_VAE, "scaling_factor": SD_VAE_SCALE, "image_size": sample_size * 8}


def _dit_factory(arch: str):
    spec = DIT_ARCHS[arch]

    def build(freq_shift: int = 1, vae: str | None = None, **overrides: Any) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        kwargs = {**diffusers_config(arch), **overrides}
        try:
            model = DiTTransformer2DModel(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{arch}: {e}; arguments are DiTTransformer2DModel's ({', '.join(diffusers_config(arch))}) "
                              "and freq_shift") from None
        return finish_dit(model, freq_shift=freq_shift, latent=_latent(spec.get("latent") or vae is not None, vae,
                                                                      kwargs["sample_size"]))

    return build


for _arch in DIT_ARCHS:
    MODELS.register(_arch, _dit_factory(_arch), family="dit", modality="diffusion", defaults=diffusers_config(_arch))


def is_dit(model: nn.Module) -> bool:
    """Whether `model` is a diffusers DiT (zoo's or one loaded by diffusers); never imports diffusers itself (a
    model can only be one once diffusers is loaded), so publishing a ViT does not pay for that import."""
    if "diffusers" not in sys.modules:
        return False
    from diffusers import DiTTransformer2DModel

    return isinstance(model, DiTTransformer2DModel)


def diffusers_card(model: nn.Module) -> dict[str, Any] | None:
    """What diffusers' `from_pretrained` reads of a published folder's config.json (`_class_name` and the model's
    config), for a zoo DiT that diffusers' own class computes the same (diffusers' timestep frequencies)."""
    if not is_dit(model) or getattr(model, "zoo_args", {}).get("freq_shift", 1) != 1:
        return None
    import diffusers

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {"_class_name": type(model).__name__, "_diffusers_version": diffusers.__version__, **config}


def config_overrides(arch: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The sample size, channels and class count of a diffusers config where they differ from `arch`'s."""
    base = diffusers_config(arch)
    keys = ("in_channels", "out_channels", "sample_size", "num_embeds_ada_norm")
    return {k: config[k] for k in keys if config.get(k) is not None and config[k] != base[k]}


def arch_for_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered DiT arch with the structure of a diffusers config (heads, head size, depth, patch), and
    the arguments that differ from it (sample size, channels, classes); a one-line error when none has it."""
    for arch in DIT_ARCHS:
        if all(config.get(k) == diffusers_config(arch)[k] for k in STRUCTURE):
            return arch, config_overrides(arch, config)
    want = ", ".join(f"{k}={config.get(k)}" for k in STRUCTURE)
    raise ConfigError(f"no zoo DiT architecture has {want}; the registered ones are {', '.join(DIT_ARCHS)}")


def as_zoo_dit(model: nn.Module, *, freq_shift: int = 1, vae: str | None = None) -> nn.Module:
    """A diffusers DiT (e.g. from `DiTTransformer2DModel.from_pretrained`) as a zoo model of the matching arch,
    same object, same weights, so `zoo.publish` and `zoo.load` round-trip it; `vae` names its latents' VAE."""
    if not is_dit(model):
        raise ConfigError(f"{type(model).__name__} is not a diffusers DiTTransformer2DModel")
    arch, args = arch_for_config(dict(model.config))
    latent = _latent(bool(DIT_ARCHS[arch].get("latent")) or vae is not None, vae, model.config.sample_size)
    finish_dit(model, freq_shift=freq_shift, latent=latent)
    args.update({"freq_shift": freq_shift} if freq_shift != 1 else {}, **({"vae": vae} if vae else {}))
    model.zoo_arch, model.zoo_args = arch, args
    return model


# -- official DiT checkpoints (facebookresearch/DiT models.py) -----------------------------------------------
def official_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an official DiT checkpoint: its `ema` weights where it has them (training checkpoints hold
    `model`, `ema`, `opt`, `args`: `ema` is what DiT samples with), else the bare state dict (FAIR's releases)."""
    sd: Any = checkpoint
    for key in ("ema", "model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            if key != "ema":
                log.warning("DiT checkpoint has no 'ema' weights; loading %r (not the weights DiT samples with)", key)
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or "x_embedder.proj.weight" not in sd:
        keys = list(sd)[:4] if isinstance(sd, Mapping) else type(sd).__name__
        raise CheckpointMismatchError(f"not an official DiT checkpoint (no x_embedder.proj.weight); its first keys "
                                      f"are {keys}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DiT keys -> diffusers' `DiTTransformer2DModel` keys. DiT's one timestep and label embedder is
    copied into every block (diffusers gives each block its own); qkv is split into q, k, v."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{name}.{p}"] = sd[f"t_embedder.mlp.{j}.{p}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for p in ("weight", "bias"):
            out[f"{dst}norm1.linear.{p}"] = sd[f"{src}adaLN_modulation.1.{p}"]
            for part, name in zip(sd[f"{src}attn.qkv.{p}"].chunk(3), ("to_q", "to_k", "to_v")):
                out[f"{dst}attn1.{name}.{p}"] = part
            out[f"{dst}attn1.to_out.0.{p}"] = sd[f"{src}attn.proj.{p}"]
            out[f"{dst}ff.net.0.proj.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            out[f"{dst}ff.net.2.{p}"] = sd[f"{src}mlp.fc2.{p}"]
    return out


def official_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers config an official DiT state dict implies (heads from DiT's sizes: S 6, B 12, L/XL 16)."""
    proj = sd["x_embedder.proj.weight"]
    width, patch = proj.shape[0], proj.shape[-1]
    heads = {384: 6, 768: 12, 1024: 16, 1152: 16}.get(width)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    return {"num_attention_heads": heads, "attention_head_dim": width // heads if heads else None,
            "num_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), "patch_size": patch,
            "in_channels": proj.shape[1], "out_channels": sd["final_layer.linear.weight"].shape[0] // (patch * patch),
            "sample_size": round(tokens**0.5) * patch if tokens else None,
            "num_embeds_ada_norm": sd["y_embedder.embedding_table.weight"].shape[0] - 1}  # DiT's table has the null row


__all__ = ["DIT_ARCHS", "diffusers_card", "config_overrides", "diffusers_config", "finish_dit", "is_dit", "arch_for_config", "as_zoo_dit",
           "official_state_dict", "official_to_diffusers", "official_config", "SD_VAE", "SD_VAE_SCALE"]
