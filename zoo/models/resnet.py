"""ResNets from timm's public `create_model`, registered so the zoo is not ViT-only."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from zoo.registry import MODELS

RESNET_ARCHS = ("resnet18", "resnet50")


def _resnet_factory(arch: str):
    def build(**kwargs: Any) -> nn.Module:
        kwargs.setdefault("num_classes", 0)  # zoo backbones return pooled features by default
        return timm.create_model(arch, pretrained=False, **kwargs)

    return build


for _arch in RESNET_ARCHS:
    MODELS.register(_arch, _resnet_factory(_arch), family="resnet", defaults={})
