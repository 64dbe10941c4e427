"""zoo.schedule: warmup, then cosine / linear / constant, for any scheduled value (lr, weight decay,
EMA momentum, temperatures), POA's truncated cosine, and the old `warmup_cosine` it replaced."""

from __future__ import annotations

import itertools
import math

import pytest

from zoo.errors import ConfigError
from zoo.schedule import Schedule, warmup_cosine


def values(schedule: Schedule, total: int, steps_per_epoch: float | None = None) -> list[float]:
    return [schedule(step, total, steps_per_epoch) for step in range(total + 1)]


def test_linear_warmup_starts_at_warmup_from():
    s = Schedule(1.0, 0.0, warmup_steps=4, warmup_from=0.2)
    assert [s(i, 20) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert Schedule(1.0, 0.0, warmup_steps=4)(0, 20) == 0.0  # warmup_from defaults to 0
    # a warmup may also come down to its start (DINO's teacher temperature warms up from above or below)
    down = Schedule(0.04, warmup_steps=2, warmup_from=0.08)
    assert [down(i, 10) for i in range(3)] == pytest.approx([0.08, 0.06, 0.04])


def test_cosine_shape():
    s = Schedule(1.0, 0.1, warmup_steps=2)
    v = values(s, 12)
    assert v[2] == pytest.approx(1.0)  # the first step after warmup is the peak
    assert v[7] == pytest.approx(0.55)  # half way through the cosine: the mean of start and end
    assert v[12] == pytest.approx(0.1)  # reaches end at the last step
    for step in range(2, 13):
        assert v[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 10)))
    assert all(a > b for a, b in itertools.pairwise(v[2:]))
    assert s(50, 12) == pytest.approx(0.1)  # past the end it stays at end
    rising = values(Schedule(0.996, 1.0), 10)  # an EMA momentum goes up
    assert rising[0] == pytest.approx(0.996) and rising[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(rising))


def test_linear_shape():
    v = values(Schedule(1.0, 0.0, shape="linear", warmup_steps=2), 12)
    assert v[2:] == pytest.approx([1.0 - i / 10 for i in range(11)])


def test_constant_shape_and_end_none():
    v = values(Schedule(1.0, 0.0, shape="constant", warmup_steps=2), 10)
    assert v[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert v[2:] == [1.0] * 9  # `end` is ignored by a constant shape
    for shape in ("cosine", "linear", "constant"):
        assert values(Schedule(0.07, shape=shape), 10) == [0.07] * 11  # end=None: stays at start
    assert values(Schedule(0.5, 0.5), 10) == [0.5] * 11


def test_warmup_in_steps_epochs_or_fraction():
    assert Schedule(1.0, warmup_steps=5).warmup_length(100) == 5
    assert Schedule(1.0, warmup_frac=0.1).warmup_length(50) == 5
    assert Schedule(1.0, warmup_epochs=1.5).warmup_length(100, steps_per_epoch=4) == 6
    assert Schedule(1.0, warmup_epochs=1.5).warmup_length(100, steps_per_epoch=4.0) == 6  # the engine's is a float
    assert Schedule(1.0).warmup_length(100) == 0
    assert Schedule(1.0, warmup_steps=500).warmup_length(10) == 10  # clamped to the run
    # the three ways to say "6 warmup steps" give the same schedule
    by_steps = values(Schedule(1.0, 0.0, warmup_steps=6), 60)
    assert values(Schedule(1.0, 0.0, warmup_frac=0.1), 60) == by_steps
    assert values(Schedule(1.0, 0.0, warmup_epochs=1.5), 60, steps_per_epoch=4) == by_steps
    assert by_steps[3] == pytest.approx(0.5) and by_steps[6] == pytest.approx(1.0)


def test_warmup_in_epochs_needs_steps_per_epoch():
    s = Schedule(1.0, 0.0, warmup_epochs=1)
    for spe in (None, 0):
        with pytest.raises(ConfigError, match="warmup in epochs needs a dataset of known size"):
            s(3, 100, spe)
    assert s(2, 100, 4) == pytest.approx(0.5)


def test_truncated_cosine_never_reaches_end():
    total = 100
    cut = Schedule(1.0, 0.0, truncate=0.78)
    v = values(cut, total)
    assert v[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(v))
    assert min(v) > 0.1  # stops at 78% of the cosine: 0.5 * (1 + cos(0.78 pi)) ~ 0.115
    assert v[-1] == pytest.approx(0.5 * (1 + math.cos(0.78 * math.pi)))
    # it is a full cosine laid over total / 0.78 steps, evaluated only up to total
    full = Schedule(1.0, 0.0)
    assert v == pytest.approx([full(step, total / 0.78) for step in range(total + 1)], rel=1e-12, abs=1e-15)
    # also with a warmup (which stays in steps, not stretched) and when rising (POA's momentum)
    warm_cut, warm_full = Schedule(1.0, 0.0, warmup_steps=10, truncate=0.78), Schedule(1.0, 0.0, warmup_steps=10)
    assert values(warm_cut, total) == pytest.approx([warm_full(s, total / 0.78) for s in range(total + 1)], rel=1e-12)
    up = values(Schedule(0.994, 1.0, truncate=0.78), total)
    assert up[-1] < 1.0 and up[-1] == pytest.approx(1.0 - 0.006 * 0.5 * (1 + math.cos(0.78 * math.pi)))


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": "step"}, "shape must be one of cosine, linear, constant"),
    ({"warmup_steps": 2, "warmup_frac": 0.1}, "one warmup length, got warmup_steps and warmup_frac"),
    ({"warmup_epochs": 1, "warmup_steps": 2}, "one warmup length"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"warmup_epochs": -0.5}, "warmup_epochs must be >= 0"),
    ({"warmup_frac": 1.0}, r"warmup_frac must be in \[0, 1\)"),
    ({"truncate": 0.0}, r"truncate must be in \(0, 1\]"),
    ({"truncate": 1.5}, r"truncate must be in \(0, 1\]"),
])
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Schedule(1.0, 0.0, **kwargs)


def test_total_must_be_positive():
    with pytest.raises(ValueError, match="total steps must be positive"):
        Schedule(1.0)(0, 0)


def old_warmup_cosine(step: int, total: int, base: float, *, warmup: int = 0, final: float = 0.0) -> float:
    """zoo.engine's warmup_cosine before Schedule replaced it (MAE's lr_sched), verbatim."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if warmup > 0 and step < warmup:
        return base * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total, warmup", [(1, 0), (1, 1), (10, 0), (10, 3), (10, 10), (37, 5), (100, 99)])
@pytest.mark.parametrize("base, final", [(1.0, 0.0), (1e-3, 1e-5), (0.5, 0.5), (0.1, 0.4)])
def test_warmup_cosine_equals_the_old_formula(total, warmup, base, final):
    for step in range(total + 3):  # also past the end
        assert warmup_cosine(step, total, base, warmup=warmup, final=final) == \
            pytest.approx(old_warmup_cosine(step, total, base, warmup=warmup, final=final), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        warmup_cosine(0, 0, base)
