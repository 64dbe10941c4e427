"""`zoo demo` end to end at a tiny budget (the full demo runs in CI through the README's first command)."""

from __future__ import annotations

import json

import pytest

import zoo


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    from zoo.demo import NAME, run_demo

    res = run_demo(tmp_path / "demo", steps=8, n_pretrain=300)
    assert res["pretrain"]["steps"] == 8
    assert set(res["mae"]) == set(res["random"]) == {
        "digits kNN top-1", "digits linear top-1", "scenes kNN top-1", "scenes linear top-1"}
    assert all(0.0 <= v <= 100.0 for r in (res["mae"], res["random"]) for v in r.values())
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["pretrain"]["steps"] == 8
    assert zoo.load(NAME).zoo_card["provenance"]["recipe"] == "mae"  # published, reloadable by name
    out = capsys.readouterr().out
    assert "random init" in out and "MAE (fractals)" in out
