"""Generative evaluation of class-conditional image generators, offline, in a zoo backbone's feature space.

`FrechetDistance` is FID's statistic (the Fréchet distance between Gaussians fitted to real and
generated features) computed by torchmetrics, but over the pooled features of a named zoo backbone
instead of Inception: nothing is downloaded, so it runs anywhere the backbone loads. FD depends on
the feature space, so its numbers compare only under one backbone: report the backbone's name with
them. `label_accuracy` checks that a conditional generator draws the class it was asked for, with a
classifier from `label_classifier` (the frozen backbone and a linear head fitted on real images).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.transforms import data_config
from zoo.errors import ConfigError, ZooError
from zoo.eval.features import pool
from zoo.eval.linear import fit_linear_head
from zoo.hub import load

Images = torch.Tensor | Iterable[torch.Tensor]


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def check_images(images: Any) -> torch.Tensor:
    """`images` if it is a float (N, C, H, W) tensor in [0, 1] with C in {1, 3}; else a ConfigError saying what to pass."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"expected images as a (N, C, H, W) tensor with C 1 or 3, got {shape}; stack PIL images "
                          "with torchvision.transforms.v2.functional.to_image and to_dtype(scale=True)")
    if not images.is_floating_point():
        raise ConfigError(f"expected float images in [0, 1], got {images.dtype}; convert with images.float() / 255")
    if images.numel() and not (torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise ConfigError("images must be finite floats in [0, 1]; map a generator's [-1, 1] output with "
                          "((x + 1) / 2).clamp(0, 1)")
    return images


def preprocess(images: torch.Tensor, cfg: Mapping[str, Any] | nn.Module) -> torch.Tensor:
    """Float [0, 1] images (N, C, H, W) as the model of `cfg` (a `pretrained_cfg` or a model) takes them:
    channels matched (grey repeated to RGB, RGB to luma), resized bilinearly (antialiased, not cropped), normalised."""
    images = check_images(images)
    dc = data_config(cfg)
    c = dc.input_size[0]
    if images.shape[1] != c:
        if c == 3:
            images = images.expand(-1, 3, -1, -1)
        elif c == 1:
            luma = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images * luma).sum(1, keepdim=True)
        else:
            raise ConfigError(f"the model takes {c}-channel input; only 1- and 3-channel models can take images here")
    if tuple(images.shape[-2:]) != dc.size:
        images = F.interpolate(images, size=dc.size, mode="bilinear", antialias=True, align_corners=False)
    mean = images.new_tensor(dc.mean).view(1, -1, 1, 1)
    std = images.new_tensor(dc.std).view(1, -1, 1, 1)
    return (images - mean) / std


def _pooled(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features of preprocessed x (the `cls` variant of the eval protocols)."""
    if hasattr(backbone, "forward_features"):
        return pool(backbone, x, ("cls",))["cls"]
    return backbone(x)


class BackboneFeatures(nn.Module):
    """A backbone as a feature extractor of float [0, 1] images of any size: (N, C, H, W) -> (N, num_features)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        c, h, w = data_config(backbone).input_size  # a clear error now for a model without preprocessing
        self.backbone = backbone
        self.num_features = int(self(torch.zeros(1, min(c, 3), h, w)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _device_dtype(self.backbone)
        x = preprocess(images.to(device), self.backbone).to(dtype)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return _pooled(self.backbone, x).float()
        finally:
            self.backbone.train(was_training)


def _resolve(backbone_or_name: nn.Module | str) -> nn.Module:
    if isinstance(backbone_or_name, str):
        return load(backbone_or_name)
    if not isinstance(backbone_or_name, nn.Module):
        raise ConfigError(f"expected a backbone (nn.Module) or a model name, got {type(backbone_or_name).__name__}")
    return backbone_or_name


def _name_of(model: nn.Module) -> str:
    """The name to report numbers under: the card's name, else the architecture, else the class."""
    card = getattr(model, "zoo_card", None) or {}
    return str(card.get("name") or getattr(model, "zoo_arch", None) or type(model).__name__)


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """`images` (a tensor, or an iterable of tensor batches) in chunks of at most batch_size."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    for batch in [images] if isinstance(images, torch.Tensor) else images:
        if not isinstance(batch, torch.Tensor):
            raise ConfigError(f"expected a tensor of images or an iterable of tensor batches, got {type(batch).__name__}")
        yield from batch.split(batch_size) if batch.dim() else [batch]


class FrechetDistance:
    """Fréchet distance of generated images to real ones in a backbone's feature space; real statistics
    are kept across calls, so one `add_real` serves every sampler setting compared.

        fd = FrechetDistance("vit_tiny_patch4_32.mae_fractal")
        fd.add_real(real_images)            # float (N, C, H, W) in [0, 1], or an iterable of such batches
        score = fd(generated_images)        # report it with fd.name
    """

    def __init__(self, backbone_or_name: nn.Module | str | None = None, batch_size: int = 256, *,
                 features: nn.Module | None = None):
        """`features` replaces the backbone by any module mapping a batch to (N, D) features (with `num_features`)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        if (backbone_or_name is None) == (features is None):
            raise ConfigError("FrechetDistance needs one of a backbone (or its name) and features=, not both or neither")
        if features is None:
            features = BackboneFeatures(_resolve(backbone_or_name))
        self.name = backbone_or_name if isinstance(backbone_or_name, str) else _name_of(getattr(features, "backbone", features))
        self.batch_size = batch_size
        device, _ = _device_dtype(features)
        self.metric = FrechetInceptionDistance(feature=features, reset_real_features=False).to(device)

    @property
    def num_real(self) -> int:
        """How many real images the statistics hold."""
        return int(self.metric.real_features_num_samples)

    def _update(self, images: Images, real: bool) -> int:
        n = 0
        for batch in _batches(images, self.batch_size):
            if len(batch):
                self.metric.update(batch, real=real)
                n += len(batch)
        return n

    def add_real(self, images: Images) -> None:
        """Add real images to the reference statistics (accumulated across calls)."""
        self._update(images, real=True)

    def __call__(self, fake_images: Images) -> float:
        """The Fréchet distance of these generated images (at least 2) to all real images added."""
        if self.num_real < 2:
            raise ZooError(f"FrechetDistance has {self.num_real} real images; call add_real with at least 2 first "
                           "(thousands for a stable number)")
        self.metric.reset()  # fake statistics only: real ones are kept (reset_real_features=False)
        n = self._update(fake_images, real=False)
        if n < 2:
            raise ZooError(f"FrechetDistance needs at least 2 generated images, got {n}")
        return float(self.metric.compute())


def frechet_distance(real: Images, fake: Images, backbone: nn.Module | str, batch_size: int = 256) -> float:
    """Fréchet distance between two image sets in `backbone`'s feature space (a model or a zoo name)."""
    fd = FrechetDistance(backbone, batch_size)
    fd.add_real(real)
    return fd(fake)


class LabelClassifier(nn.Module):
    """A frozen backbone and a linear head on its pooled features: preprocessed images -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.pretrained_cfg = backbone.pretrained_cfg

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.head(_pooled(self.backbone, x).float())
        finally:
            self.backbone.train(was_training)


def label_classifier(backbone: nn.Module | str, train_images: Images, train_labels: torch.Tensor, *,
                     batch_size: int = 256, seed: int = 0, **probe: Any) -> LabelClassifier:
    """A classifier of float [0, 1] images for `label_accuracy`: the frozen backbone and an L-BFGS linear head
    (`zoo.eval.linear.fit_linear_head`, keywords in `probe`) fitted on its features of the training images."""
    features = BackboneFeatures(_resolve(backbone))
    feats = torch.cat([features(b).cpu() for b in _batches(train_images, batch_size)])
    labels = torch.as_tensor(train_labels).long().cpu()
    if len(feats) != len(labels):
        raise ConfigError(f"label_classifier got {len(feats)} images and {len(labels)} labels; pass one label per image")
    head = fit_linear_head(feats, labels, seed=seed, **probe).to(_device_dtype(features.backbone)[0])
    return LabelClassifier(features.backbone, head)


@torch.no_grad()
def label_accuracy(images: Images, labels: torch.Tensor, classifier: nn.Module, batch_size: int = 256) -> float:
    """Top-1 (%) of `classifier` (preprocessed images -> logits, with a `pretrained_cfg`) on float [0, 1]
    images against the labels they were generated for."""
    device, dtype = _device_dtype(classifier)
    labels = torch.as_tensor(labels).long().cpu()
    was_training = classifier.training
    classifier.eval()
    try:
        preds = [classifier(preprocess(b.to(device), classifier).to(dtype)).argmax(1).cpu()
                 for b in _batches(images, batch_size)]
    finally:
        classifier.train(was_training)
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    if len(pred) != len(labels) or not len(labels):
        raise ConfigError(f"label_accuracy got {len(pred)} images and {len(labels)} labels; pass one label per image")
    return 100.0 * (pred == labels).float().mean().item()
