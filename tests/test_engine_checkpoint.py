"""Engine pieces: atomic checkpoints, keep-last-K, refusal of foreign checkpoints, schedules, RNG state."""

from __future__ import annotations

import random

import pytest
import torch

from zoo.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zoo.schedule import warmup_cosine


def state(step, fp="abc"):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "fingerprint": fp, "rng": rng_state()}


def test_save_keeps_last_k_and_loads_latest(tmp_path):
    for s in (10, 20, 30):
        save_checkpoint(state(s), tmp_path, s, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_000000020.pt", "step_000000030.pt"]
    got = load_checkpoint(latest_checkpoint(tmp_path), fingerprint="abc")
    assert got["step"] == 30 and torch.equal(got["model"]["w"], torch.full((3,), 30.0))


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path, 1)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="previous checkpoint is intact: step_000000001.pt"):
        save_checkpoint(state(2), tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000001.pt"]  # no .part left
    monkeypatch.undo()
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path):
    p = save_checkpoint(state(5, fp="other-recipe"), tmp_path, 5)
    with pytest.raises(CheckpointError, match="another recipe"):
        load_checkpoint(p, fingerprint="abc")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a zoo training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_rng_state_round_trip():
    s = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(s)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 1.0, warmup=10) == 0.0
    assert warmup_cosine(5, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, warmup=10, final=0.1) == pytest.approx(0.1)
