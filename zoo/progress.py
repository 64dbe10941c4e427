"""Progress of long loops: a tqdm bar on a terminal, plain periodic log lines elsewhere (Slurm, nohup, CI).

`progress(...)` is the one helper every long loop uses. Bars are for a person watching a terminal
(stderr a TTY and CI unset); otherwise the same calls write a line through the `zoo.progress` logger
at INFO: at the first update, then at most every `ZOO_PROGRESS_EVERY` seconds (default 30), and at
the end. That logger is set to INFO so the lines reach any handler (the CLI's), whatever the root
level; with no handler configured (a plain library call) Python drops INFO records, so nothing spams.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from zoo.errors import ConfigError

log = logging.getLogger("zoo.progress")
log.setLevel(logging.INFO)  # lines show wherever logging has a handler; silence with setLevel(WARNING)

EVERY_ENV = "ZOO_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0  # seconds between lines: ~120 lines an hour, a few per short eval


def progress_enabled() -> bool:
    """Bars only for a person watching a terminal."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def line_interval() -> float:
    """Seconds between progress lines: `$ZOO_PROGRESS_EVERY`, else 30 (0: a line at every update)."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also catches nan
        raise ConfigError(f"{EVERY_ENV}={raw!r}: give the seconds between progress lines, a number >= 0 (e.g. 30)")
    return value


class Bar(tqdm):
    """A tqdm bar with `ProgressLines`' extra method, so loops need not ask which one they hold."""

    def due(self, n: int = 1) -> bool:
        """Never: a bar redraws itself, nobody needs to prepare a line for it."""
        return False


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0.0) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _rate(per_s: float, unit: str) -> str:
    if 0 < per_s < 1:
        return f"{1 / per_s:.3g} s/{unit}"
    return f"{per_s:.0f} {unit}/s" if per_s >= 100 else f"{per_s:.3g} {unit}/s"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class ProgressLines:
    """tqdm's `update` / `set_postfix` / `close` / iteration, written as log lines: one at the first
    update, then when `every` seconds have passed since the last, and one at the end."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start = initial
        self.every = line_interval() if every is None else float(every)
        self.clock = clock
        self.t0 = clock()
        self.first: tuple[float, int] | None = None  # (time, n) of the first update: the rate leaves start-up out
        self.last_time: float | None = None
        self.last_n: int | None = None
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("ProgressLines without an iterable cannot be iterated; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def due(self, n: int = 1) -> bool:
        """Whether `update(n)` now writes a line (so a caller can read fresh values for it first)."""
        if self.closed:
            return False
        if self.last_time is None or (self.total is not None and self.n + n >= self.total):
            return True
        return self.clock() - self.last_time >= self.every

    def update(self, n: int = 1) -> None:
        """Count `n` more units; writes a line when one is due."""
        write = self.due(n)
        self.n += n
        now = self.clock()
        if self.first is None:
            self.first = (now, self.n)
        if write:
            self._write(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """The values shown after the count (replacing the previous ones), as in tqdm."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """A last line for the units counted since the previous one."""
        if not self.closed and self.first is not None and self.last_n != self.n:
            self._write(self.clock())
        self.closed = True

    def line(self, now: float) -> str:
        """`desc: unit n/total (pct%) k=v ... | rate unit/s, elapsed, ETA` (or `done in` at the end)."""
        count = f"{self.unit} {self.n}" + (f"/{self.total}" if self.total else "")
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        parts += [f"{k}={_value(v)}" for k, v in self.postfix.items()]
        t_ref, n_ref = self.first if self.first is not None and self.n > self.first[1] else (self.t0, self.start)
        rate = (self.n - n_ref) / max(now - t_ref, 1e-9)
        elapsed = now - self.t0
        if self.total and self.n >= self.total:
            timing = f"{_rate(rate, self.unit)}, done in {_duration(elapsed)}"
        else:
            timing = f"{_rate(rate, self.unit)}, elapsed {_duration(elapsed)}"
            if self.total and rate > 0:
                timing += f", ETA {_duration((self.total - self.n) / rate)}"
        return " ".join(parts) + " | " + timing

    def _write(self, now: float) -> None:
        log.info("%s", self.line(now))
        self.last_time, self.last_n = now, self.n


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    quiet: bool = False,
    every: float | None = None,
    **bar_kwargs: Any,
) -> Bar | ProgressLines:
    """A tqdm bar on a terminal, else periodic log lines (`ProgressLines`); `quiet=True` shows neither."""
    if quiet or progress_enabled():
        return Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=quiet, dynamic_ncols=True,
                   **bar_kwargs)
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, initial=initial, every=every)


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A bare tqdm bar that follows `progress_enabled()` unless `disable=` is given (no lines; see `progress`)."""
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
