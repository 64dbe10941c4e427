"""Per-step schedules: linear warmup then half-cosine, for the LR and any other scheduled value."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base: float, *, warmup: int = 0, final: float = 0.0) -> float:
    """`base * step / warmup` during warmup, then cosine from `base` to `final` at `total` (MAE's lr_sched)."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if warmup > 0 and step < warmup:
        return base * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
