"""What the engine hands the methods and takes back from them, beside the `Method` class itself
(`zoo.recipes.base`): where training stands, and a model to publish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class Progress:
    """Where training stands, passed to the hooks: optimizer steps done, the run's total, the data
    epoch and the optimizer steps per epoch (None when the dataset size is unknown)."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: float | None

    @property
    def epochs_done(self) -> float:
        """Fractional epochs trained (step / steps_per_epoch), or the epoch counter when unknown."""
        return self.step / self.steps_per_epoch if self.steps_per_epoch else float(self.epoch)


@dataclass
class Export:
    """A model to publish and what its card adds (e.g. POA's sub-network width and depth)."""

    model: nn.Module
    card: dict[str, Any] = field(default_factory=dict)


__all__ = ["Progress", "Export"]
