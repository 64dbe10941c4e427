"""Build registered architectures by name (random init) and list them.

Architectures only: weights live in `zoo.hub`, one layer up, which wraps these into the
`pretrained=`-aware `zoo.create_model` / `zoo.list_models`. Nothing here imports the hub.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import zoo.models  # noqa: F401  (registers the architectures)
from zoo.errors import ConfigError
from zoo.registry import MODELS


def split_name(name: str) -> tuple[str, str | None]:
    """`arch.tag` -> (arch, tag); a name without a tag -> (name, None)."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A registered architecture, randomly initialised (the tag of an `arch.tag` name is ignored).

    Keyword arguments override the architecture's defaults (e.g. `num_classes=10`). For published
    weights use `zoo.create_model(name, pretrained=True)` or `zoo.load(name)`.
    """
    if kwargs.pop("pretrained", False):
        raise ConfigError(
            "zoo.factory.create_model builds architectures only; use zoo.create_model(name, pretrained=True) "
            "or zoo.load(name) for weights"
        )
    arch, _ = split_name(name)
    model = MODELS.build(arch, **kwargs)
    model.zoo_arch = arch
    model.zoo_args = dict(kwargs)
    return model


def list_models(pattern: str | None = None) -> list[str]:
    """Registered architecture names matching a wildcard (`zoo.list_models(pretrained=True)` lists weights)."""
    return MODELS.names(pattern)


def count_params(arch: str, **kwargs: Any) -> int:
    """Parameter count of an architecture, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MODELS.build(arch, **kwargs)
    return sum(p.numel() for p in model.parameters())
