"""Build registered architectures by name (random init) and list them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import zoo.models  # noqa: F401  (registers the architectures)
from zoo.registry import MODELS


def split_name(name: str) -> tuple[str, str | None]:
    """`arch.tag` -> (arch, tag); a name without a tag -> (name, None)."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A registered architecture, randomly initialised; `pretrained=True` is `zoo.load(name, **kwargs)`.

    `name` may carry a weights tag (`vit_tiny_patch4_32.mae_fractal`); the tag is ignored unless
    `pretrained=True`. Keyword arguments override the architecture's defaults (e.g. `num_classes=10`).
    """
    if pretrained:
        from zoo.hub import load

        return load(name, **kwargs)
    arch, _ = split_name(name)
    model = MODELS.build(arch, **kwargs)
    model.zoo_arch = arch
    model.zoo_args = dict(kwargs)
    return model


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered architecture names matching a wildcard; with `pretrained=True`, names that have weights."""
    if not pretrained:
        return MODELS.names(pattern)
    from zoo.hub import pretrained_names

    return pretrained_names(pattern)


def count_params(arch: str, **kwargs: Any) -> int:
    """Parameter count of an architecture, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MODELS.build(arch, **kwargs)
    return sum(p.numel() for p in model.parameters())
