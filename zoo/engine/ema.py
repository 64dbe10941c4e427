"""Exponential moving averages of a model's weights: the EMA teacher of DINO, iBOT and POA.

    teacher = ema_copy(student)                       # a frozen copy, same weights
    ema_update(teacher, student, momentum=0.996)      # after every optimizer step

The momentum is usually a schedule (cosine 0.996 -> 1): declare it in `Method.schedules()` and read
`self.scheduled["momentum"]`; `cosine_momentum` is DINO's rule for a recipe that wants it by hand.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from zoo.schedule import Schedule


def ema_copy(model: nn.Module) -> nn.Module:
    """A deep copy that trains never: no gradients, eval mode (the method declares it frozen state)."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (matched by
    name, so both must have the same structure); floating buffers follow the same rule."""
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(t_params.keys() ^ s_params.keys())[:4]
        raise ValueError(f"EMA teacher and student differ in parameters, e.g. {missing}")
    pairs = [(t_params[n], s_params[n]) for n in t_params]
    pairs += [(t, s) for (_, t), (_, s) in zip(teacher.named_buffers(), student.named_buffers()) if t.is_floating_point()]
    weight = 1.0 - float(momentum)
    for t, s in pairs:
        t.lerp_(s.to(t.dtype), weight)


def cosine_momentum(base: float = 0.996, final: float = 1.0) -> Schedule:
    """DINO's teacher momentum: a cosine from `base` to `final` over the run."""
    return Schedule(base, final, shape="cosine")


__all__ = ["ema_copy", "ema_update", "cosine_momentum"]
