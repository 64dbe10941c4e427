"""Per-step schedules: a warmup, then a cosine, linear or constant shape, for any scheduled value.

The learning rate, weight decay, an EMA teacher's momentum, a teacher temperature or a loss weight
are all the same kind of thing: `Schedule(start, end, shape, warmup...)` evaluated at an optimizer
step. `truncate < 1` is DINOv2/POA's truncated cosine: the shape is laid out over `total / truncate`
steps and cut at `total`, so it never reaches `end`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from zoo.errors import ConfigError

SHAPES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """A value over optimizer steps: linear warmup from `warmup_from` to `start`, then `shape` from
    `start` to `end` (`end=None`: stays at `start`). Warmup is given in steps, epochs or a fraction
    of the run (at most one); epochs need the steps per epoch, which the engine knows."""

    start: float
    end: float | None = None
    shape: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_frac: float | None = None
    warmup_from: float = 0.0
    truncate: float = 1.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"schedule shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        given = [k for k in ("warmup_steps", "warmup_epochs", "warmup_frac") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"a schedule takes one warmup length, got {' and '.join(given)}; keep one")
        for key in given:
            if getattr(self, key) < 0:
                raise ConfigError(f"schedule {key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_frac is not None and self.warmup_frac >= 1:
            raise ConfigError(f"schedule warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 < self.truncate <= 1:
            raise ConfigError(f"schedule truncate must be in (0, 1] (1: a full cosine), got {self.truncate}")

    def warmup_length(self, total: int, steps_per_epoch: int | None = None) -> int:
        """Warmup steps in a run of `total` optimizer steps (clamped to the run)."""
        if self.warmup_steps is not None:
            n = self.warmup_steps
        elif self.warmup_epochs is not None:
            if not steps_per_epoch:
                raise ConfigError("a warmup in epochs needs a dataset of known size; give warmup_steps instead")
            n = round(self.warmup_epochs * steps_per_epoch)
        else:
            n = round((self.warmup_frac or 0.0) * total)
        return min(int(n), total)

    def __call__(self, step: int, total: int, steps_per_epoch: int | None = None) -> float:
        """The value at optimizer step `step` of `total`."""
        if total <= 0:
            raise ValueError(f"total steps must be positive, got {total}")
        warmup = self.warmup_length(total, steps_per_epoch)
        if step < warmup:
            return self.warmup_from + (self.start - self.warmup_from) * step / warmup
        end = self.start if self.end is None else self.end
        if self.shape == "constant" or end == self.start:
            return self.start
        span = max(1.0, total / self.truncate - warmup)
        progress = min(1.0, (step - warmup) / span)
        if self.shape == "linear":
            return self.start + (end - self.start) * progress
        return end + (self.start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, base: float, *, warmup: int = 0, final: float = 0.0) -> float:
    """`base * step / warmup` during warmup, then cosine from `base` to `final` at `total` (MAE's lr_sched)."""
    return Schedule(base, final, warmup_steps=warmup)(step, total)


__all__ = ["Schedule", "warmup_cosine", "SHAPES"]
