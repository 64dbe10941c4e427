"""The Method contract every pretraining recipe implements (see DESIGN.md, "The Method contract").

The engine never knows which method it runs: it builds the method's module, feeds it batches
from `data_spec()`, steps the optimizer on `training_step(...)["loss"]`, calls `on_step_end`,
checkpoints the module whole, and publishes what `export()` returns. Methods never write loops,
checkpoint code or loggers; their losses are plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class DataSpec:
    """What a method reads from the shards and how the engine prepares it."""

    fields: tuple[str, ...] = ("image",)  # required sample fields (zoo field names)
    optional_fields: tuple[str, ...] = ()
    train_transform: dict[str, Any] = field(default_factory=dict)  # kwargs of zoo.data.transforms.train_transform
    views: int = 1  # >1: the method wants several augmented views per image


class Method(nn.Module):
    """Base class: holds everything trainable and frozen, so the engine checkpoints it whole."""

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Return at least {"loss": scalar tensor}; other entries are logged as metrics."""
        raise NotImplementedError

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Per-step updates outside the gradient (EMA teachers, temperature schedules)."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: by default, no decay for biases, norms and 1-D parameters
        (the rule MAE uses via timm's `param_groups_weight_decay`)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def data_spec(self) -> DataSpec:
        return DataSpec()

    def export(self) -> dict[str, nn.Module]:
        """Backbones to publish, by tag suffix ("" for the main one); each was built by zoo.create_model."""
        return {}
