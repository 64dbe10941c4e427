"""Every registered recipe, from its own CPU YAML with no --data (its built-in data): it trains, it
learns (its loss ends below the same run's with learning switched off), it resumes after SIGKILL to
the same weights, and every model it exports loads by its published name with the trained weights.
The test grows by itself: a method registered with a `cpu_recipe` is in it (after the recipes its
`prerequisites` names, e.g. the one that publishes its teacher, are run the same way)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zoo
from zoo.config import installed_recipes, load_config
from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint
from zoo.engine.contract import Export
from zoo.engine.trainer import build_method, pretrain
from zoo.registry import RECIPES

# Tiny steps on tiny built-in data: a few seconds per recipe. Only run-length keys, the same for all
# (64 samples: more than LOOK's k = 50 neighbours, which must be fewer than its memory bank).
SMOKE = ["schedule.steps=8", "schedule.warmup_steps=2", "optim.lr=1e-3", "data.batch_size=8", "data.builtin_n=64",
         "data.num_workers=0", "eval.final=[]", "eval.every=0", "output.log_every=1", "output.checkpoint_every=4",
         "output.plots=false", "output.tensorboard=false"]
METHODS = [e.name for e in RECIPES]


def test_every_method_ships_a_cpu_recipe():
    found = installed_recipes()
    for entry in RECIPES:
        cpu = entry.meta.get("cpu_recipe")
        assert cpu in found, f"{entry.name}: register it with cpu_recipe=<one of its YAMLs>"
        cfg = load_config(cpu)
        assert cfg.method.name == entry.name and cfg.data.train is None and cfg.data.builtin, \
            f"{cpu}: the CPU recipe trains on its built-in data (data.builtin) with no --data"


@pytest.mark.parametrize("method", METHODS)
def test_recipe_trains_learns_resumes_and_publishes(method, tmp_path):
    recipe = RECIPES.get(method).meta["cpu_recipe"]
    for i, prerequisite in enumerate(RECIPES.get(method).meta.get("prerequisites", ())):  # e.g. a teacher to publish
        pretrain(prerequisite, run_dir=tmp_path / f"prerequisite{i}", overrides=SMOKE)
    straight = pretrain(recipe, run_dir=tmp_path / "straight", overrides=SMOKE)
    losses = [m["loss"] for m in straight.metrics]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(2)
        from zoo.engine.trainer import pretrain
        def die(step, row):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain({recipe!r}, run_dir={str(killed)!r}, overrides={SMOKE!r}, on_step=die)
    """)
    # started now (its data and prerequisites exist), so that its interpreter start-up overlaps the run below
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "CI": "true"})
    try:
        shown_by = RECIPES.get(method).meta.get("learning_shown_by")
        if shown_by is None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # leaves a core to the other process, whose threads must match the straight run's
            try:
                frozen = pretrain(recipe, run_dir=tmp_path / "frozen",
                                  overrides=[*SMOKE, "optim.lr=1e-12", "output.publish=null"])
            finally:
                torch.set_num_threads(threads)
            still = [m["loss"] for m in frozen.metrics]
            assert sum(losses[-3:]) < sum(still[-3:]), f"{method} does not learn: {losses} vs no learning {still}"
        else:  # e.g. a streaming memory bank: 8 steps' losses compare a stale bank with a frozen model's consistent one
            tests = {p.name for p in Path(__file__).parent.glob("test_*.py")}
            assert Path(shown_by.split("::")[0]).name in tests, shown_by
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = pretrain(recipe, run_dir=killed, overrides=SMOKE, resume=True)
    assert resumed.steps == 8
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))["model"]
    b = load_checkpoint(latest_checkpoint(killed))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{method}: resume differs"

    cfg = load_config(recipe, SMOKE)
    trained = build_method(cfg)
    trained.load_state_dict(a)
    exports = trained.export(cfg.output.publish)
    assert set(straight.published) == set(exports) and cfg.output.publish in exports
    for name, item in exports.items():
        model = item.model if isinstance(item, Export) else item  # (an LM has a .model of its own)
        loaded = zoo.load(name)
        assert loaded.zoo_card["provenance"]["recipe"] == method and loaded.zoo_card["provenance"]["steps"] == 8
        mine, theirs = model.state_dict(), loaded.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    done = json.loads((tmp_path / "straight" / "done.json").read_text())
    assert done["steps"] == 8 and set(done["published"]) == set(exports)
