"""Class-conditional diffusion training of a DiT (Ho et al. 2020's objective, Peebles & Xie 2023's model), the
models T-Stitch stitches (`zoo.eval.sampling.TStitch`).

    x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   t ~ U{0..T−1},   ε ~ N(0, I)
    loss = ‖ ε − ε_θ(x_t, t, y) ‖²      (DDPM's "simple" noise-prediction loss)

ᾱ from a diffusers noise schedule (`DDPMScheduler.add_noise`; DiT's: linear β 1e-4 → 0.02 over 1000 steps).
Classifier-free guidance dropout: each sample's label becomes the null class (the model's last embedding
row) with probability `cfg_dropout` (DiT: 0.1), once per sample, so sampling can guide. An EMA of the weights
(DiT: 0.9999, warmed up as diffusers' EMAModel, momentum ≤ (1 + step) / (10 + step)) is what gets published.
A learned-σ model (DiT's paper sizes, 2C outputs) trains its ε half here; DiT's variational σ term is not
part of this objective (sampling with it is not needed by any diffusers scheduler used here).

Data: images scaled to [-1, 1] (pixel DiTs), or precomputed VAE latents from an array field (`latent_field`,
e.g. `latent.npy` members, already multiplied by the VAE's scaling factor) for the latent DiTs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.engine.ema import ema_copy, ema_update
from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec, Export, Method
from zoo.registry import MODELS, RECIPES


def diffusion_loss(model: nn.Module, noise_schedule: Any, x0: torch.Tensor, labels: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM's simple loss: mean squared error of the model's ε (its first C outputs) at the noised x_t."""
    xt = noise_schedule.add_noise(x0, noise, t)
    eps = model(xt, timestep=t, class_labels=labels).sample[:, : x0.shape[1]]
    return F.mse_loss(eps.float(), noise.float())


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free guidance dropout: each label replaced by `null_class` with probability p."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


class DiffusionSample:
    """A sample -> {image or latent, label}, in the loader workers: the image center-cropped, optionally flipped
    (DiT) and scaled to [-1, 1], or the precomputed latent as float32; the label and the latent's shape checked
    against the model (one-line errors, before any step)."""

    def __init__(self, model: nn.Module, arch: str, latent_field: str | None, hflip: float):
        from zoo.data.transforms import train_transform

        self.arch, self.latent_field = arch, latent_field
        self.classes = model.num_classes
        self.shape = tuple(model.pretrained_cfg["input_size"])
        self.image = None if latent_field else train_transform(model.pretrained_cfg, scale=(1.0, 1.0),
                                                               ratio=(1.0, 1.0), hflip=hflip)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        label = int(sample["label"])
        if not 0 <= label < self.classes:
            raise ConfigError(f"diffusion: labels must lie in 0..{self.classes - 1} for {self.arch}, got {label}; "
                              "set num_embeds_ada_norm in the method's arguments")
        if self.latent_field is None:
            return {"image": self.image(sample["image"]), "label": label}
        latent = torch.from_numpy(np.asarray(sample[self.latent_field], dtype=np.float32))
        if tuple(latent.shape) != self.shape:
            raise ConfigError(f"diffusion: field {self.latent_field!r} holds arrays of shape {tuple(latent.shape)}; "
                              f"{self.arch} denoises {self.shape}")
        return {self.latent_field: latent, "label": label}


class Diffusion(Method):
    """DDPM noise prediction for a class-conditional zoo DiT (`arch`), with label dropout and EMA weights."""

    def __init__(self, arch: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, cfg_dropout: float = 0.1,
                 ema_momentum: float = 0.9999, hflip: float = 0.0, latent_field: str | None = None,
                 **arch_overrides: Any):
        super().__init__()
        from diffusers import DDPMScheduler

        if MODELS.get(arch).meta.get("family") != "dit":
            dits = [n for n in zoo.list_models("dit_*")]
            raise ConfigError(f"diffusion: {arch!r} is not a DiT architecture; use one of {', '.join(dits)}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ConfigError(f"diffusion: cfg_dropout is a probability in [0, 1), got {cfg_dropout}")
        if not 0.0 <= ema_momentum < 1.0:
            raise ConfigError(f"diffusion: ema_momentum must lie in [0, 1), got {ema_momentum}")
        self.model = zoo.create_model(arch, **arch_overrides)
        self.ema = self.freeze(ema_copy(self.model))  # state: checkpointed, published
        self.schedule = {"num_train_timesteps": int(num_train_timesteps), "beta_schedule": beta_schedule,
                         "beta_start": float(beta_start), "beta_end": float(beta_end), "prediction_type": "epsilon"}
        try:
            self.noise = DDPMScheduler(**self.schedule)
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"diffusion: noise schedule {self.schedule} is not one diffusers has ({e})") from None
        self.cfg_dropout = float(cfg_dropout)
        self.ema_momentum = float(ema_momentum)
        self.hflip = float(hflip)
        self.latent_field = latent_field
        self.arch = arch

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        x0, labels = batch[self.latent_field or "image"], batch["label"].long()  # labels checked in the loader
        t = torch.randint(0, self.schedule["num_train_timesteps"], (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        dropped = drop_labels(labels, self.cfg_dropout, self.model.null_class)
        loss = diffusion_loss(self.model, self.noise, x0, dropped, t, noise)
        return {"loss": loss, "dropped": (dropped != labels).float().mean()}

    def on_step_end(self, progress: Any) -> None:
        momentum = min(self.ema_momentum, (1 + progress.step) / (10 + progress.step))
        ema_update(self.ema, self.model, momentum)

    def data_spec(self) -> DataSpec:
        field = self.latent_field or "image"
        return DataSpec(fields=(field, "label"), transform=DiffusionSample(self.model, self.arch, self.latent_field,
                                                                            self.hflip))

    def backbone(self) -> nn.Module:
        """The DiT in training (its preprocessing sets the built-in data's size)."""
        return self.model

    def export(self, name: str) -> dict[str, Export]:
        """The EMA weights, their card recording the noise schedule samplers must use."""
        card = {"diffusion": {"schedule": self.schedule, "cfg_dropout": self.cfg_dropout,
                              "ema_momentum": self.ema_momentum, "weights": "ema"}}
        return {name: Export(self.ema, card=card)}

    @torch.no_grad()
    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/samples.png: a row per class (up to 10) of EMA samples, DDIM 25 steps, guidance 2."""
        from zoo.engine.plots import image_grid
        from zoo.eval.sampling import make_scheduler, sample

        if self.latent_field is not None:
            return []  # no VAE here to decode latents
        classes = min(self.model.num_classes, 10)
        labels = torch.arange(classes).repeat_interleave(8)
        generator = torch.Generator().manual_seed(0)
        result = sample(self.ema, make_scheduler("ddim", self.schedule), labels, steps=25, guidance_scale=2.0,
                        generator=generator, progress=False)
        rows, c = list(result.images.split(8)), result.images.shape[1]
        return [image_grid(rows, folder / "samples.png", mean=(0.0,) * c, std=(1.0,) * c,
                           row_labels=[f"class {i}" for i in range(classes)])]


RECIPES.register(
    "diffusion",
    Diffusion,
    family="diffusion",
    paper="arXiv:2006.11239 (DDPM), arXiv:2212.09748 (DiT)",
    cpu_recipe="diffusion_dit_tiny_patch2_8_digits",
    description="DiT diffusion training: DDPM noise prediction, classifier-free-guidance label dropout, EMA weights "
                "published (the models T-Stitch samples with)",
)

__all__ = ["Diffusion", "DiffusionSample", "diffusion_loss", "drop_labels"]
