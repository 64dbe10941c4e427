"""Backbones. Importing this package registers every architecture in `zoo.registry.MODELS`."""

from zoo.models import clip, dit, flame, lm, resnet, sequence, vit  # noqa: F401  (registration side effects)
from zoo.models.vit import VisionTransformer

__all__ = ["VisionTransformer"]
