"""zoo.progress: a bar on a terminal, periodic log lines elsewhere (first, every N seconds, last)."""

from __future__ import annotations

import io
import logging

import pytest

from zoo.errors import ConfigError
from zoo.progress import Bar, ProgressLines, line_interval, progress, progress_enabled


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zoo.progress"]


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ZOO_PROGRESS_EVERY", raising=False)


def test_lines_at_the_first_update_every_interval_and_the_last(caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    clock = Clock()
    p = ProgressLines(total=100, desc="mae", unit="step", every=30, clock=clock)
    for step in range(1, 101):
        clock.t += 1.0  # one step a second
        if p.due():
            p.set_postfix({"loss": "0.5000", "img/s": "64"})
        p.update(1)
    p.close()
    got = lines(caplog)
    slow = ProgressLines(total=9, unit="step", initial=2, clock=lambda: 200.0)
    slow.n = 3
    assert "| 100 s/step, elapsed 0:01:40, ETA 0:10:00" in slow.line(300.0)  # under 1 step/s: seconds per step
    # step 1, then steps 31, 61, 91 (30 s after the previous line), then the last step; close adds nothing
    assert [line.split(" (")[0] for line in got] == [f"mae: step {s}/100" for s in (1, 31, 61, 91, 100)]
    assert got[1] == "mae: step 31/100 (31%) loss=0.5000 img/s=64 | 1 step/s, elapsed 0:00:31, ETA 0:01:09"
    assert got[-1].endswith("| 1 step/s, done in 0:01:40") and "ETA" not in got[-1]


def test_due_tells_ahead_whether_update_writes(caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    clock = Clock()
    p = ProgressLines(total=10, unit="step", every=5, clock=clock)
    assert p.due()  # the first update always writes
    p.update()
    clock.t += 4
    assert not p.due()
    p.update()
    clock.t += 1
    assert p.due()
    assert len(lines(caplog)) == 1


def test_iterating_ends_with_a_line_even_when_stopped_early(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    for i in progress(range(1000), desc="features", unit="batch"):
        if i == 9:
            break
    got = lines(caplog)
    assert len(got) == 2, got  # the first batch, then the close after the break (well under 30 s)
    assert got[0].startswith("features: batch 1/1000 (0%) | ") and "ETA" in got[0]
    assert got[1].startswith("features: batch 9/1000 (1%) | ")  # as tqdm: the batch in hand is not done


def test_unknown_total_counts_without_eta(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    list(progress(iter(range(3)), desc="scores", unit="img", every=0))
    assert [line.split(" | ")[0] for line in lines(caplog)] == ["scores: img 1", "scores: img 2", "scores: img 3"]
    assert not any("ETA" in line for line in lines(caplog))


def test_a_terminal_gets_a_bar_and_no_lines(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled()
    with progress(total=3, desc="mae", unit="step") as bar:
        assert isinstance(bar, Bar) and not bar.due()
        bar.update(3)
    assert "3/3" in tty.getvalue() and not lines(caplog)


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_ci_turns_bars_into_lines_even_on_a_terminal(monkeypatch, ci):
    monkeypatch.setattr("sys.stderr", FakeTTY())
    monkeypatch.setenv("CI", ci)
    assert not progress_enabled()
    assert isinstance(progress(total=3), ProgressLines)


def test_quiet_shows_neither(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="zoo.progress")
    with progress(total=2, quiet=True) as bar:
        bar.update(2)
    assert isinstance(bar, Bar) and bar.disable and not lines(caplog)


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("ZOO_PROGRESS_EVERY", raising=False)
    assert line_interval() == 30.0
    monkeypatch.setenv("ZOO_PROGRESS_EVERY", "5")
    assert line_interval() == 5.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("ZOO_PROGRESS_EVERY", bad)
        with pytest.raises(ConfigError, match="ZOO_PROGRESS_EVERY.*number >= 0"):
            line_interval()


def test_lines_reach_a_handler_configured_at_warning(no_terminal):
    """The CLI configures logging at WARNING unless -v: the progress logger still passes its INFO lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        list(progress(range(2), desc="x"))
        logging.getLogger("zoo.eval").info("other INFO stays quiet")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert "x: it 1/2" in stream.getvalue() and "x: it 2/2" in stream.getvalue()
    assert "other INFO" not in stream.getvalue()
