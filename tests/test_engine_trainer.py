"""The training loop: it learns, it resumes exactly after a SIGKILL, and it refuses to clobber runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from zoo.data import write_shards
from zoo.data.builtin import generate
from zoo.engine.trainer import pretrain
from zoo.errors import ZooError


@pytest.fixture
def fractal_shards(tmp_path):
    write_shards(generate("fractals", 64, size=32), tmp_path / "shards", maxcount=32)
    return str(tmp_path / "shards" / "{00000..00001}.tar")


def recipe(data: str, steps: int = 12, **output) -> dict:
    return {
        "method": {"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
                   "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4},
        "model": {"arch": "vit_nano_patch4_32"},
        "data": {"train": data, "batch_size": 8, "num_workers": 0, "shuffle": 16},
        "optim": {"lr": 1e-3, "weight_decay": 0.05},
        "schedule": {"steps": steps, "warmup_steps": 2},
        "output": {"checkpoint_every": 4, "log_every": 1, "keep_last": 2, **output},
        "seed": 3,
    }


def weights(run_dir):
    from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))["model"]


def test_loss_goes_down_and_files_are_written(fractal_shards, tmp_path):
    res = pretrain(recipe(fractal_shards, steps=30), run_dir=tmp_path / "run")
    losses = [m["loss"] for m in res.metrics]
    assert res.steps == 30 and len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    for f in ("config.yaml", "metrics.jsonl", "done.json", "plots/loss.png", "plots/lr.png", "plots/reconstruction.png"):
        assert (tmp_path / "run" / f).is_file(), f
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "plots" / "reconstruction.png")
    assert grid.size == (8 * 32 * 3, 4 * 32 * 3)  # 8 images x (original, masked, reconstruction, pasted)
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2  # keep_last
    with pytest.raises(ZooError, match="already holds a run"):
        pretrain(recipe(fractal_shards, steps=30), run_dir=tmp_path / "run")


def test_sigkill_then_resume_equals_uninterrupted(fractal_shards, tmp_path):
    straight = tmp_path / "straight"
    pretrain(recipe(fractal_shards), run_dir=straight)

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, json, torch
        torch.set_num_threads(2)
        from zoo.engine.trainer import pretrain
        r = json.loads({json.dumps(json.dumps(recipe(fractal_shards)))!s})
        def die(step, row):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        pretrain(r, run_dir={str(killed)!r}, on_step=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CI": "true"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "done.json").exists()
    res = pretrain(recipe(fractal_shards), run_dir=killed, resume=True)
    assert res.steps == 12
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_resume_refuses_a_checkpoint_from_another_recipe(fractal_shards, tmp_path):
    pretrain(recipe(fractal_shards, steps=4), run_dir=tmp_path / "a")
    other = recipe(fractal_shards, steps=8)
    other["method"]["decoder_dim"] = 32
    from zoo.engine.checkpoint import latest_checkpoint

    with pytest.raises(ZooError, match="another recipe"):
        pretrain(other, run_dir=tmp_path / "b", resume=str(latest_checkpoint(tmp_path / "a")))


def test_online_knn_is_logged_every_n_steps(fractal_shards, tmp_path):
    for split in ("train", "val"):
        write_shards(generate("digits", 100, split=split), tmp_path / split)
    r = recipe(fractal_shards, steps=6)
    r["eval"] = {"knn_train": str(tmp_path / "train" / "*.tar"), "knn_val": str(tmp_path / "val" / "*.tar"),
                 "every": 3, "k": 5}
    res = pretrain(r, run_dir=tmp_path / "run")
    with_knn = [m["step"] for m in res.metrics if "knn_top1" in m]
    assert with_knn == [3, 6]
    assert all(0.0 <= m["knn_top1"] <= 100.0 for m in res.metrics if "knn_top1" in m)


def test_bf16_autocast_trains_and_compile_is_refused(fractal_shards, tmp_path):
    r = recipe(fractal_shards, steps=3)
    r["amp"] = "bf16"
    res = pretrain(r, run_dir=tmp_path / "bf16")
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in res.metrics)
    r = recipe(fractal_shards, steps=3)
    r["compile"] = True
    with pytest.raises(ZooError, match="compile"):
        pretrain(r, run_dir=tmp_path / "compiled")


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(fractal_shards, tmp_path):
    """`torchrun --nproc_per_node 2 -m zoo pretrain ...`: gloo, data split by rank, one consistent checkpoint."""
    import yaml

    r = recipe(fractal_shards, steps=4)
    r["data"]["batch_size"] = 4
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "zoo", "pretrain", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((tmp_path / "ddp" / "done.json").read_text())
    assert done["world_size"] == 2 and done["ranks_consistent"] is True
    assert done["samples_per_rank"] == [16, 16]  # 4 steps x batch 4 on each rank
    assert [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()] == ["step_000000004.pt"]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 alone writes
