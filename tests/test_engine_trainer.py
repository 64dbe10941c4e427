"""The training loop: it learns, it resumes exactly after a SIGKILL, and it refuses to clobber runs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
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
from zoo.recipes.base import DataSpec, Method


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
    # 8 images x (original, masked, reconstruction, pasted), each 32 px drawn 3x: at least that big, wider than tall
    assert grid.mode in ("RGB", "RGBA") and grid.width >= 8 * 32 * 3 and grid.height >= 4 * 32 * 3
    assert grid.width > 1.5 * grid.height
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
    r["eval"] = {"train": str(tmp_path / "train" / "*.tar"), "val": str(tmp_path / "val" / "*.tar"),
                 "every": 3, "k": 5}
    res = pretrain(r, run_dir=tmp_path / "run")
    with_knn = [m["step"] for m in res.metrics if "knn_top1" in m]
    assert with_knn == [3, 6]
    assert all(0.0 <= m["knn_top1"] <= 100.0 for m in res.metrics if "knn_top1" in m)


def test_bf16_autocast_trains(fractal_shards, tmp_path):
    r = recipe(fractal_shards, steps=3)
    r["amp"] = "bf16"
    res = pretrain(r, run_dir=tmp_path / "bf16")
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in res.metrics)


def test_checkpoint_every_zero_writes_only_the_last(fractal_shards, tmp_path):
    pretrain(recipe(fractal_shards, steps=3, checkpoint_every=0), run_dir=tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000000003.pt"]


def test_tensorboard_events_hold_the_logged_metrics(fractal_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = pretrain(recipe(fractal_shards, steps=4), run_dir=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert {"loss", "lr", "img_per_s"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in res.metrics]


def test_tensorboard_gets_the_methods_pictures_at_the_step_drawn(fractal_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = pretrain(recipe(fractal_shards, steps=2), run_dir=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert "plots/reconstruction" in events.Tags()["images"]
    [image] = events.Images("plots/reconstruction")
    png = Image.open(tmp_path / "run" / "plots" / "reconstruction.png")
    assert image.step == res.steps == 2 and (image.width, image.height) == png.size
    assert [e.step for e in events.Scalars("loss")] == [1, 2]  # the scalars are all still read alongside


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zoo.progress"]


def test_without_a_terminal_training_logs_progress_lines(fractal_shards, tmp_path, monkeypatch, caplog):
    """Slurm, nohup, `| tee` or CI: no bar, but a line at the first step, every 30 s, and at the last."""
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("ZOO_PROGRESS_EVERY", raising=False)
    caplog.set_level(logging.INFO, logger="zoo.progress")
    rows = []
    pretrain(recipe(fractal_shards, steps=4, log_every=3, plots=False, tensorboard=False), run_dir=tmp_path / "run",
             on_step=lambda step, row: rows.append(row))
    lines = progress_lines(caplog)
    assert len(lines) == 2, lines  # a few seconds of training: the first step and the last
    first = re.fullmatch(r"mae: step 1/4 \(25%\) loss=(\S+) lr=(\S+) img/s=\d+ \| \S+ (?:step/s|s/step), elapsed \S+, "
                         r"ETA \d+:\d\d:\d\d", lines[0])
    assert first, lines[0]
    # the line shows that step's own values, though step 1 is not a log_every step
    assert first.groups() == (f"{rows[0]['loss']:.4f}", f"{rows[0]['lr']:.2e}")
    assert lines[1].startswith(f"mae: step 4/4 (100%) loss={rows[3]['loss']:.4f} ") and "done in" in lines[1]


def test_on_a_terminal_training_shows_a_bar_not_lines(fractal_shards, tmp_path, monkeypatch, caplog):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.delenv("CI", raising=False)
    caplog.set_level(logging.INFO, logger="zoo.progress")
    pretrain(recipe(fractal_shards, steps=2, plots=False, tensorboard=False), run_dir=tmp_path / "run")
    assert not progress_lines(caplog)
    assert "2/2" in tty.getvalue() and "loss=" in tty.getvalue()


def test_layer_decay_scales_the_encoder_lr_by_depth(fractal_shards, tmp_path):
    from zoo.config import load_config
    from zoo.engine.trainer import build_method

    r = recipe(fractal_shards, steps=3)
    r["optim"]["layer_decay"] = 0.1
    torch.manual_seed(r["seed"])  # what the engine seeds before building: the run's initial weights
    method = build_method(load_config(r))
    start = {k: v.clone() for k, v in method.state_dict().items()}
    groups = method.param_groups(0.05, 0.1)
    names = {id(p): n for n, p in method.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    depth = len(method.encoder.blocks)
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.1 ** (depth + 1))  # the stem decays most
    assert scale["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.1 ** depth)
    assert scale[f"encoder.blocks.{depth - 1}.mlp.fc2.bias"] == pytest.approx(0.1)
    assert scale["encoder.norm.weight"] == scale["decoder.decoder_pred.weight"] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if p.ndim == 1)

    pretrain(r, run_dir=tmp_path / "run")
    end = weights(tmp_path / "run")
    moved = {k: (end[k] - start[k]).abs().mean().item() for k in start}
    assert moved["decoder.decoder_pred.weight"] > 0
    # Adam's step is about lr * sign(grad): the engine applied each group's lr_scale
    assert moved["encoder.patch_embed.proj.weight"] < 1e-3 * moved["decoder.decoder_pred.weight"]
    assert moved["encoder.blocks.0.attn.qkv.weight"] < moved[f"encoder.blocks.{depth - 1}.attn.qkv.weight"]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(fractal_shards, tmp_path, monkeypatch):
    import errno

    import zoo.engine.checkpoint as ckpt
    from zoo.engine.checkpoint import CheckpointError, list_checkpoints

    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):
        if obj["step"] == 8:  # the second checkpoint: write part of it, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact: step_000000004.pt"):
        pretrain(recipe(fractal_shards), run_dir=tmp_path / "run")
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000000004.pt"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial file
    res = pretrain(recipe(fractal_shards), run_dir=tmp_path / "run", resume=True)
    assert res.steps == 12 and (tmp_path / "run" / "done.json").is_file()


@pytest.mark.slow
def test_compile_trains_like_eager(fractal_shards, tmp_path):
    eager = pretrain(recipe(fractal_shards, steps=3), run_dir=tmp_path / "eager")
    r = recipe(fractal_shards, steps=3)
    r["compile"] = True
    compiled = pretrain(r, run_dir=tmp_path / "compiled")
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # regional compilation keeps the state-dict names
    assert [m["loss"] for m in compiled.metrics] == pytest.approx([m["loss"] for m in eager.metrics], rel=1e-3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


@pytest.mark.slow
def test_torchrun_fsdp_matches_ddp_and_resumes_exactly(fractal_shards, tmp_path):
    """On 2 CPU processes (gloo): `torchrun -m zoo pretrain` with DDP splits the data by rank and writes one
    consistent run; FSDP2 gives the same weights as DDP, and its stop + resume equals a straight run."""
    import yaml

    r = recipe(fractal_shards, steps=4)
    r["data"]["batch_size"] = 4
    r["output"]["checkpoint_every"] = 2
    r["output"]["publish"] = "vit_nano_patch4_32.fsdp_test"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from zoo.engine.trainer import pretrain
        r = json.loads({json.dumps(json.dumps(r))!s})
        r["distributed"] = sys.argv[1]
        stop = int(sys.argv[3]) if len(sys.argv) > 3 else None
        pretrain(r, run_dir=sys.argv[2], stop_after=stop, resume=stop is None and "resume" in sys.argv[2])
    """))

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump({**r, "distributed": "ddp"}))
    torchrun("-m", "zoo", "pretrain", str(tmp_path / "ddp.yaml"), "--run-dir", str(tmp_path / "ddp"))
    torchrun(str(script), "fsdp", str(tmp_path / "fsdp"))
    torchrun(str(script), "fsdp", str(tmp_path / "fsdp_resume"), "2")
    assert not (tmp_path / "fsdp_resume" / "done.json").exists()
    torchrun(str(script), "fsdp", str(tmp_path / "fsdp_resume"))

    for run, mode in (("ddp", "ddp"), ("fsdp", "fsdp")):
        done = json.loads((tmp_path / run / "done.json").read_text())
        assert done["distributed"] == mode and done["world_size"] == 2 and done["ranks_consistent"] is True
        assert done["overlapping_samples"] == 0  # the ranks trained on disjoint samples
        assert done["samples_per_rank"] == [16, 16]  # 4 steps x batch 4 on each rank
    assert "step_000000004.pt" in [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 4  # rank 0 alone writes
    fsdp, ddp, fsdp_resumed = (weights(tmp_path / d) for d in ("fsdp", "ddp", "fsdp_resume"))
    assert fsdp.keys() == ddp.keys()
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < 1e-6  # the same averaged gradients
    assert all(torch.equal(fsdp[k], fsdp_resumed[k]) for k in fsdp), "FSDP resume differs (per-rank RNG not restored?)"
    import zoo

    published = zoo.load("vit_nano_patch4_32.fsdp_test").state_dict()  # gathered from the shards on rank 0
    assert all(torch.equal(published[k], fsdp["encoder." + k]) for k in published)


# -- the contract's shapes: a toy float64 regression and a frozen teacher loaded by name -------------
class LinearRegression(Method):
    """loss = mean((x . w - y)^2) in float64: gradients of a batch are exact means of per-sample ones."""

    def __init__(self, arch: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def data_spec(self) -> DataSpec:
        return DataSpec(fields=("array",), transform=lambda s: {"xy": torch.from_numpy(s["array"])})

    def training_step(self, batch, step):
        x, y = batch["xy"][:, :4], batch["xy"][:, 4]
        return {"loss": ((x @ self.w - y) ** 2).mean()}

    def backbone(self):
        return self


@pytest.fixture
def registered():
    from zoo.registry import RECIPES

    added = []

    def register(name, factory):
        RECIPES.register(name, factory)
        added.append(name)

    yield register
    for name in added:
        RECIPES._entries.pop(name)


def test_accumulation_across_an_epoch_boundary_equals_the_big_batch(tmp_path, registered):
    """2 micro-batches of 2 with accum_steps=2 = one batch of 4, also when the 4 straddle two epochs
    (6 samples: 3 micro-batches an epoch). float64, tolerance 1e-12 (sums in another order)."""
    import numpy as np

    registered("test_linreg", LinearRegression)
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(6, 5))
    write_shards(({"__key__": f"{i:09d}", "array": xy[i]} for i in range(6)), tmp_path / "d", maxcount=6)
    lr, steps = 0.1, 3
    r = {"method": {"name": "test_linreg"}, "model": {"arch": "none"},
         "data": {"train": str(tmp_path / "d" / "00000.tar"), "batch_size": 2, "shuffle": 0},
         "optim": {"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "accum_steps": 2},
         "schedule": {"steps": steps, "kind": "constant"}, "eval": {"final": []},
         "output": {"checkpoint_every": 0, "log_every": 1}}
    pretrain(r, run_dir=tmp_path / "run")
    w = torch.zeros(4, dtype=torch.float64)
    order = list(range(6)) * 2  # shuffle 0: the shard's order, epoch after epoch
    t = torch.from_numpy(xy)
    for s in range(steps):  # step 2 takes samples 4, 5 of epoch 0 and 0, 1 of epoch 1
        big = t[order[4 * s : 4 * s + 4]]
        x, y = big[:, :4], big[:, 4]
        w -= lr * (2 * x.T @ (x @ w - y) / len(big))
    got = weights(tmp_path / "run")["w"]
    assert torch.allclose(got, w, atol=1e-12, rtol=0), (got, w)


class Distill(Method):
    """A student ViT regressing a frozen teacher's class token: the teacher is loaded by name."""

    def __init__(self, arch: str, teacher: str):
        super().__init__()
        import zoo

        self.student = zoo.create_model(arch)
        self.teacher = self.load_frozen(teacher, like=self.student)

    def training_step(self, batch, step):
        assert not self.teacher.training and self.student.training
        with torch.no_grad():
            target = self.teacher.forward_features(batch["image"])[:, 0]
        return {"loss": ((self.student.forward_features(batch["image"])[:, 0] - target) ** 2).mean()}

    def backbone(self):
        return self.student


def test_frozen_teacher_loaded_by_name_is_not_trained_or_checkpointed(fractal_shards, tmp_path, registered):
    import zoo
    from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint

    registered("test_distill", Distill)
    teacher = zoo.create_model("vit_nano_patch4_32")
    zoo.publish(teacher, "vit_nano_patch4_32.teacher")
    r = {"method": {"name": "test_distill", "teacher": "vit_nano_patch4_32.teacher"},
         "model": {"arch": "vit_nano_patch4_32"}, "data": {"train": fractal_shards, "batch_size": 8, "shuffle": 16},
         "optim": {"lr": 1e-3, "clip_grad": 1.0}, "schedule": {"steps": 6}, "eval": {"final": []},
         "output": {"checkpoint_every": 3, "log_every": 1}}
    pretrain(r, run_dir=tmp_path / "straight")
    state = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    assert state["model"] and not any(k.startswith("teacher.") for k in state["model"])  # re-loaded by name instead
    n_student = len([p for p in teacher.parameters()])
    assert len(state["optimizer"]["state"]) == n_student  # only the student's parameters are optimised
    pretrain(r, run_dir=tmp_path / "resumed", stop_after=3)
    pretrain(r, run_dir=tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from zoo.engine.trainer import build_method
    from zoo.config import load_config

    method = build_method(load_config(r))
    method.load_state_dict(a)  # strict: the teacher's keys are missing on purpose
    assert all(torch.equal(x, y) for x, y in zip(method.teacher.state_dict().values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_a_teacher_that_cuts_another_patch_grid_is_refused(registered):
    import zoo

    registered("test_distill", Distill)
    zoo.publish(zoo.create_model("vit_tiny_patch8_64"), "vit_tiny_patch8_64.teacher")
    with pytest.raises(ZooError, match="same patch grid") as info:
        Distill("vit_nano_patch4_32", "vit_tiny_patch8_64.teacher")
    assert "\n" not in str(info.value)
    with pytest.raises(ZooError, match="cannot load the frozen model 'vit_nano_patch4_32.nope'"):
        Distill("vit_nano_patch4_32", "vit_nano_patch4_32.nope")
