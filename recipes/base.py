"""The Method contract every pretraining recipe implements (see DESIGN.md, "The Method contract").

The engine never knows which method it runs: it builds the method's module, feeds it batches
from `data_spec()`, steps the optimizer on `training_step(...)["loss"]`, calls `on_step_end`,
checkpoints the module whole, and publishes what `export()` returns. Methods never write loops,
checkpoint code or loggers; their losses are plain functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from zoo.errors import ZooError


@dataclass
class DataSpec:
    """What a method reads from the shards and how the engine prepares it."""

    fields: tuple[str, ...] = ("image",)  # required sample fields (zoo field names)
    optional_fields: tuple[str, ...] = ()
    train_transform: dict[str, Any] = field(default_factory=dict)  # kwargs of zoo.data.transforms.train_transform
    views: int = 1  # >1: the method wants several augmented views per image
    # per-sample work in the loader's workers after the image transform (pick a caption, tokenize):
    # sample dict (zoo field names, "image" already a tensor) -> the dict training_step receives, batched
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class Method(nn.Module):
    """Base class: holds everything trainable and frozen, so the engine checkpoints it whole."""

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar tensor}; other entries are logged as metrics."""
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Per-step updates outside the gradient (EMA teachers, temperature schedules)."""

    def param_groups(self, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups: no decay for biases, norms and 1-D parameters (the rule MAE uses via timm's
        `param_groups_weight_decay`); with `layer_decay`, MAE/BEiT fine-tuning's layer-wise lr decay over
        the exported backbone: `lr_scale = layer_decay ** (depth + 1 - layer)` with the stem at layer 0,
        block i at i + 1, and everything else (final norm, decoders, heads) at depth + 1, i.e. scale 1."""
        layer_of, top = self._backbone_layers() if layer_decay is not None else ({}, 0)
        groups: dict[tuple[bool, float], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decay = not (p.ndim <= 1 or name.endswith(".bias"))
            scale = layer_decay ** (top - layer_of.get(name, top)) if layer_decay is not None else 1.0
            group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                       "lr_scale": scale})
            group["params"].append(p)
        return list(groups.values())

    def _backbone_layers(self) -> tuple[dict[str, int], int]:
        """(method parameter name -> layer in the main exported backbone, depth + 1), read from the
        backbone's timm-style `group_matcher` (stem regex, then the block-index regex)."""
        backbone = next(iter(self.export().values()), None)
        if backbone is None or not hasattr(backbone, "group_matcher"):
            raise ZooError(f"{type(self).__name__}: optim.layer_decay needs an exported backbone with a "
                           "group_matcher (a zoo ViT); set optim.layer_decay: null")
        matcher = backbone.group_matcher(coarse=False)
        stem, block = re.compile(matcher["stem"]), re.compile(matcher["blocks"][0][0])
        prefix = next(n for n, m in self.named_modules() if m is backbone)
        prefix = prefix + "." if prefix else ""
        top = len(backbone.blocks) + 1
        layers = {}
        for name, _ in backbone.named_parameters():
            found = block.match(name)
            layers[prefix + name] = 0 if stem.match(name) else int(found.group(1)) + 1 if found else top
        return layers, top

    def repeated_blocks(self) -> list[nn.Module]:
        """The repeated layers (every child of a `*blocks` Sequential/ModuleList): the units FSDP
        shards one by one and `compile: true` compiles one by one (regional compilation)."""
        return [block for name, m in self.named_modules()
                if name.rsplit(".", 1)[-1].endswith("blocks") and isinstance(m, (nn.Sequential, nn.ModuleList))
                for block in m]

    def data_spec(self) -> DataSpec:
        return DataSpec()

    def export(self) -> dict[str, nn.Module]:
        """Backbones to publish, by tag suffix ("" for the main one); each was built by zoo.create_model."""
        return {}
