"""Supervised pretraining baselines for LOOK (see recipes/look.py): cross-entropy and SupCon.

Cross-entropy (`supervised`): backbone -> linear classifier, softmax cross-entropy with label smoothing,
optionally on mixup/cutmix batches (timm's `Mixup`, drawn per batch in the loader workers, so seeded and
resumable). It pulls every image of a class towards one direction, the classifier's weight.

SupCon (`supcon`; Khosla et al., NeurIPS 2020, arXiv:2004.11362): two views of each image, an MLP projection
head, and for every view i the loss

    L_i = -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )

over all 2B views (of all ranks), P(i) the other views with i's label ("L_out" of the paper, τ = 0.1). It
pulls *all* same-class samples together.

Both publish the backbone only (no classifier, no projection head); the shared parts (labelled views with
their checks, the backbone, the projection head) are what LOOK builds on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import zoo
from zoo.data.transforms import train_transform
from zoo.data.pipeline import dist_info
from zoo.engine.distributed import all_gather, all_gather_with_grad
from zoo.errors import ConfigError, SampleError
from zoo.recipes.base import DataSpec, Export, Method, check_vit_overrides
from zoo.registry import MODELS, RECIPES


# -- losses --------------------------------------------------------------------------------------
def supcon_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, contrast: torch.Tensor,
                contrast_labels: torch.Tensor, anchor_offset: int = 0, temperature: float = 0.1,
                base_temperature: float | None = None) -> torch.Tensor:
    """SupCon's L_out, mean over anchors. `anchors` (A, D) and `contrast` (N, D) are L2-normalised; anchor a is
    row `anchor_offset + a` of `contrast` (left out of its own sums). Anchors without a positive are left out
    of the mean. `base_temperature` (default τ) scales the loss by τ / base, as the official code does."""
    logits = anchors @ contrast.T / temperature
    rows = torch.arange(len(anchors), device=anchors.device)
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[rows, rows + anchor_offset] = False
    logits = logits - logits.detach().max(dim=1, keepdim=True).values
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positive = (anchor_labels[:, None] == contrast_labels[None, :]) & not_self
    count = positive.sum(1)
    mean_log_prob = (log_prob * positive).sum(1) / count.clamp(min=1)
    scale = temperature / (base_temperature or temperature)
    has = (count > 0).to(mean_log_prob.dtype)  # a weighted mean, not a selection: no host sync in the step
    return -scale * (mean_log_prob * has).sum() / has.sum().clamp(min=1)


# -- data ----------------------------------------------------------------------------------------
class LabelledViews:
    """Per-sample transform (loader workers): `n_views` crops of the image and its label, checked.

    A sample without a label, or with one outside 0..num_classes-1, is a one-line SampleError naming it (a
    supervised method must not train on silently relabelled or dropped data)."""

    def __init__(self, views: list[Any], num_classes: int, label_field: str = "label"):
        self.views, self.num_classes, self.label_field = views, num_classes, label_field

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        label = sample.get(self.label_field)
        if label is None:
            raise SampleError(f"{_where(sample)} has no {self.label_field!r} (a .cls member): supervised pretraining "
                              "needs every sample labelled; label the shards or filter them (zoo shards check lists "
                              "the fields)")
        if not 0 <= int(label) < self.num_classes:
            raise SampleError(f"{_where(sample)} has label {label}, outside the declared classes "
                              f"0..{self.num_classes - 1}; set method.num_classes to the data's class count")
        out: dict[str, Any] = {"label": int(label)}
        if "__index__" in sample:
            out["__index__"] = sample["__index__"]
        images = [view(sample["image"]) for view in self.views]
        if len(images) == 1:
            out["image"] = images[0]
        else:
            out["views"] = images
        return out


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"


class MixupCollate:
    """Per-batch collate (loader workers): stack, then timm's Mixup/CutMix on the batch: `image` mixed and
    `target` the mixed, smoothed one-hot labels (`label` stays the first image's class, for accuracy)."""

    def __init__(self, mixup: Any):
        self.mixup = mixup

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        batch["image"], batch["target"] = self.mixup(batch["image"], batch["label"])
        return batch


def projection_head(dim: int, hidden_dim: int, out_dim: int, kind: str) -> nn.Module:
    """SupCon's and LOOK's projection: `mlp` (Linear, ReLU, Linear), `linear`, or `none` (the features)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    if kind == "linear":
        return nn.Linear(dim, out_dim)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"head must be 'mlp', 'linear' or 'none', got {kind!r}")


# -- the shared base -----------------------------------------------------------------------------
class LabelledPretraining(Method):
    """A zoo backbone (`arch`, class token, no head) trained from labels: the views and checks every supervised
    recipe shares; subclasses add the loss. Publishes the backbone alone."""

    name = "supervised"

    def __init__(self, arch: str, num_classes: int, views: int = 1, crop_scale: tuple[float, float] = (0.2, 1.0),
                 **arch_overrides: Any):
        super().__init__()
        if MODELS.get(arch).meta.get("family") != "vit":
            raise ConfigError(f"{self.name}: {arch!r} is not a ViT architecture; this recipe trains a zoo ViT")
        check_vit_overrides(type(self), self.name, arch_overrides)
        if "num_classes" in arch_overrides:
            raise ConfigError(f"{self.name}: the backbone is published without a classifier; num_classes is the "
                              "method's (method.num_classes), not the model's")
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ConfigError(f"{self.name}: num_classes must be an integer >= 2 (the labels' classes), got {num_classes!r}")
        if not (isinstance(views, int) and views >= 1):
            raise ConfigError(f"{self.name}: views must be an integer >= 1, got {views!r}")
        self.encoder = zoo.create_model(arch, num_classes=0, **arch_overrides)
        self.arch, self.num_classes, self.views = arch, num_classes, views
        self.crop_scale = tuple(crop_scale)

    def view_transforms(self) -> list[Any]:
        """One transform per view: `views` random resized crops (+ flips) of the model's input size."""
        return [train_transform(self.encoder.pretrained_cfg, scale=self.crop_scale)] * self.views

    def data_spec(self) -> DataSpec:
        return DataSpec(fields=("image",), optional_fields=("label",),
                        transform=LabelledViews(self.view_transforms(), self.num_classes))

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's views stacked view-major: (views x B, C, H, W)."""
        return torch.cat(batch["views"]) if "views" in batch else batch["image"]

    def backbone(self) -> nn.Module:
        return self.encoder

    def export(self, name: str) -> dict[str, Export]:
        return {name: Export(self.encoder, card={"pretraining": {"method": self.name, "classes": self.num_classes}})}


class Supervised(LabelledPretraining):
    """Cross-entropy pretraining: backbone -> Linear(num_classes), label smoothing, optional mixup/cutmix."""

    name = "supervised"

    def __init__(self, arch: str, num_classes: int, label_smoothing: float = 0.1, mixup: float = 0.0,
                 cutmix: float = 0.0, mix_prob: float = 1.0, switch_prob: float = 0.5, views: int = 1,
                 crop_scale: tuple[float, float] = (0.2, 1.0), **arch_overrides: Any):
        super().__init__(arch, num_classes, views=views, crop_scale=crop_scale, **arch_overrides)
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"supervised: label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup < 0 or cutmix < 0:
            raise ConfigError(f"supervised: mixup and cutmix are Beta(α, α) parameters >= 0 (0: off), got {mixup}, {cutmix}")
        self.classifier = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.label_smoothing = float(label_smoothing)
        self.mix = dict(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=float(mix_prob),
                        switch_prob=float(switch_prob))

    def data_spec(self) -> DataSpec:
        spec = super().data_spec()
        if self.mix["mixup_alpha"] > 0 or self.mix["cutmix_alpha"] > 0:
            if self.views != 1:
                raise ConfigError("supervised: mixup/cutmix mix single views; set views: 1")
            from timm.data import Mixup

            spec.collate = MixupCollate(Mixup(**self.mix, label_smoothing=self.label_smoothing,
                                              num_classes=self.num_classes))
        return spec

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.encoder(self.images(batch)))
        labels = batch["label"].repeat(self.views)
        if "target" in batch:  # mixed, smoothed soft targets from the collate
            loss = torch.sum(-batch["target"].repeat(self.views, 1) * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean() * 100
        return {"loss": loss, "acc": acc.detach()}


class SupCon(LabelledPretraining):
    """SupCon: `views` crops per image, an MLP projection to `head_dim`, L_out at `temperature` over all views of
    all ranks (each rank's anchors against the gathered views)."""

    name = "supcon"

    def __init__(self, arch: str, num_classes: int, temperature: float = 0.1, base_temperature: float | None = None,
                 head: str = "mlp", head_hidden_dim: int = 512, head_dim: int = 128, views: int = 2,
                 crop_scale: tuple[float, float] = (0.2, 1.0), **arch_overrides: Any):
        super().__init__(arch, num_classes, views=views, crop_scale=crop_scale, **arch_overrides)
        if views < 2:
            raise ConfigError(f"supcon: the loss contrasts views of the same image; views must be >= 2, got {views}")
        if temperature <= 0:
            raise ConfigError(f"supcon: temperature must be > 0, got {temperature}")
        self.head = projection_head(self.encoder.embed_dim, head_hidden_dim, head_dim, head)
        self.temperature, self.base_temperature = float(temperature), base_temperature

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        z = F.normalize(self.head(self.encoder(self.images(batch))), dim=-1)
        labels = batch["label"].repeat(self.views)
        rank, _ = dist_info()
        every_z, every_label = all_gather_with_grad(z), all_gather(labels)  # this rank's anchors vs every view
        loss = supcon_loss(z, labels, every_z, every_label, rank * len(z), self.temperature, self.base_temperature)
        return {"loss": loss}


RECIPES.register(
    "supervised", Supervised, family="supervised", cpu_recipe="supervised_vit_nano_patch4_32_digits_coarse",
    description="cross-entropy pretraining (label smoothing, mixup/cutmix), the backbone published",
    # A ViT from scratch shows no learning in the registry test's 8 fresh batches of 8 (its loss moves by noise).
    learning_shown_by="tests/test_recipe_look.py::test_cross_entropy_learns_a_fixed_batch",
)
RECIPES.register(
    "supcon", SupCon, family="supcon", cpu_recipe="supcon_vit_nano_patch4_32_digits_coarse", paper="arXiv:2004.11362",
    description="SupCon: supervised contrastive loss over two views with an MLP projection",
)

__all__ = ["Supervised", "SupCon", "LabelledPretraining", "LabelledViews", "MixupCollate", "supcon_loss",
           "projection_head"]
