"""The engine side of the Method contract, end to end through `pretrain`: schedules, optimizers and lr
multipliers, init_from, built-in data, final evals into the card, export names, stable sample indices,
a collate that drops samples, and `.pth` fields read with weights_only."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import tarfile
import uuid

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

import zoo
from zoo.config import load_config
from zoo.data import DataError, loader, write_shards
from zoo.data.builtin import generate
from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint
from zoo.engine.trainer import Trainer, build_method, build_optimizer, pretrain, publish_exports
from zoo.errors import ConfigError
from zoo.recipes.base import DataSpec, Method
from zoo.registry import RECIPES
from zoo.schedule import Schedule

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # vit_nano_patch4_32, cut down: seconds per run on 2 cores
N = 32  # fractal samples in the shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fractals") / "shards"
    write_shards(generate("fractals", N, size=32), out, maxcount=8)
    return str(out / "{00000..00003}.tar")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The curves and reconstructions are tested elsewhere; here they only cost time."""
    monkeypatch.setattr("zoo.engine.trainer.draw_plots", lambda *a, **k: None)


def recipe(train: str | None, steps: int = 3, *, optim: dict | None = None, **sections) -> dict:
    r = {
        "method": {"name": "mae", "mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "model": {"arch": "vit_nano_patch4_32", **TINY},
        "data": {"batch_size": 4, "num_workers": 0, "shuffle": 8, **({"train": train} if train else {})},
        "optim": {"lr": 1e-3, "weight_decay": 0.05, **(optim or {})},
        "schedule": {"steps": steps, "warmup_steps": 1},
        "output": {"checkpoint_every": 0, "log_every": 1, "tensorboard": False},
        "seed": 3,
    }
    for key, value in sections.items():
        r[key] = {**r[key], **value} if isinstance(r.get(key), dict) and isinstance(value, dict) else value
    return r


def final_checkpoint(run_dir) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))


def initial_weights(r: dict) -> dict[str, torch.Tensor]:
    """The weights a run of `r` starts from (the engine seeds before building the method)."""
    torch.manual_seed(r["seed"])
    return {k: v.clone() for k, v in build_method(load_config(r)).state_dict().items()}


# ---------------------------------------------------------------- a stub method, registered per test


class Stub(Method):
    """A linear layer on a 4x4 thumbnail: the smallest thing the engine can train. It declares two
    schedules, echoes what it was given as metrics, can carry `__index__` and drop samples in collate."""

    def __init__(self, arch: str = "none", drop: int = 0, index: bool = False):
        super().__init__()
        self.net = nn.Linear(48, 1)
        self.net.pretrained_cfg = {"input_size": (3, 32, 32)}
        self.drop, self.index = drop, index

    def schedules(self) -> dict[str, Schedule]:
        return {"temperature": Schedule(0.1, 0.2), "loss_weight": Schedule(1.0, shape="constant")}

    def training_step(self, batch, step):
        out = {"loss": self.net(batch["x"]).pow(2).mean() * self.scheduled["loss_weight"],
               "temperature_seen": torch.tensor(self.scheduled["temperature"])}
        if self.index:
            out.update({f"index_{i}": v for i, v in enumerate(batch["__index__"].tolist())})
        return out

    def data_spec(self) -> DataSpec:
        def transform(sample):
            thumb = np.asarray(sample["image"].resize((4, 4)), dtype=np.float32) / 255
            return {"x": torch.from_numpy(thumb).flatten()}

        collate = (lambda batch: default_collate(batch[: len(batch) - self.drop])) if self.drop else None
        return DataSpec(fields=("image",), transform=transform, collate=collate, index=self.index)

    def backbone(self) -> nn.Module:
        return self.net


@pytest.fixture
def stub():
    name = f"zoo_test_stub_{uuid.uuid4().hex[:8]}"
    RECIPES.register(name, Stub)
    try:
        yield name
    finally:
        RECIPES._entries.pop(name, None)


def stub_recipe(name: str, data: str, steps: int = 3, **method) -> dict:
    r = recipe(data, steps)
    r["method"] = {"name": name, **method}
    r["model"] = {"arch": "vit_nano_patch4_32"}  # the stub ignores it
    return r


# ---------------------------------------------------------------- 1. schedules


def test_weight_decay_schedule_reaches_the_decay_groups_only(shards, tmp_path):
    r = recipe(shards, steps=5, optim={"weight_decay": 0.04, "weight_decay_end": 0.4})
    res = pretrain(r, run_dir=tmp_path / "run")
    wd = [m["weight_decay"] for m in res.metrics]
    # the value used for step s (logged at s + 1): a cosine from 0.04 up to 0.4 over the 5 steps, no warmup
    assert wd == pytest.approx([0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)])
    assert wd[0] == pytest.approx(0.04) and all(a < b for a, b in itertools.pairwise(wd))
    groups = final_checkpoint(tmp_path / "run")["optimizer"]["param_groups"]
    decayed = [g for g in groups if g["decay"]]
    assert decayed and len(decayed) < len(groups)
    assert all(g["weight_decay"] == pytest.approx(wd[-1]) for g in decayed)
    assert all(g["weight_decay"] == 0.0 for g in groups if not g["decay"])  # biases, norms: never decayed


def test_method_schedules_are_evaluated_and_overridable(stub, shards, tmp_path):
    r = stub_recipe(stub, shards, steps=4)
    r["schedules"] = {"temperature": {"end": 0.5, "shape": "linear"}}
    res = pretrain(r, run_dir=tmp_path / "run")
    expected = [0.1 + 0.4 * s / 4 for s in range(4)]  # the override: linear to 0.5 instead of a cosine to 0.2
    assert [m["temperature"] for m in res.metrics] == pytest.approx(expected)
    assert [m["temperature_seen"] for m in res.metrics] == pytest.approx(expected)  # what the method read
    assert [m["loss_weight"] for m in res.metrics] == [1.0] * 4


def test_an_undeclared_schedule_is_a_config_error_naming_the_declared_ones(stub, shards, tmp_path):
    r = stub_recipe(stub, shards)
    r["schedules"] = {"bogus": {"start": 1}}
    with pytest.raises(ConfigError, match=r"schedules\.bogus.*its schedules: temperature, loss_weight"):
        pretrain(r, run_dir=tmp_path / "a")
    r["schedules"] = {"temprature": {"start": 1}}
    with pytest.raises(ConfigError, match=r"did you mean 'schedules\.temperature'"):
        pretrain(r, run_dir=tmp_path / "b")
    r["schedules"] = {"temperature": {"begin": 1}}
    with pytest.raises(ConfigError, match=r"schedules\.temperature: .*begin.*a schedule has start, end"):
        pretrain(r, run_dir=tmp_path / "c")
    r = recipe(shards)  # MAE schedules nothing
    r["schedules"] = {"bogus": {"start": 1}}
    with pytest.raises(ConfigError, match=r"MAE schedules no value 'bogus' \(its schedules: none"):
        pretrain(r, run_dir=tmp_path / "d")


def test_constant_lr_after_warmup_and_sqrt_lr_scaling(shards, tmp_path):
    r = recipe(shards, steps=5, optim={"lr": None, "blr": 1e-3, "lr_scaling": "sqrt"},
               schedule={"steps": 5, "warmup_steps": 2, "kind": "constant"})
    res = pretrain(r, run_dir=tmp_path / "run")
    peak = 1e-3 * math.sqrt(4 / 256)  # blr * sqrt(global batch / 256), DINOv2's rule
    assert [m["lr"] for m in res.metrics] == pytest.approx([0.0, peak / 2, peak, peak, peak], rel=1e-9, abs=1e-15)
    assert load_config(r).optim.resolved_lr(4) == pytest.approx(peak)
    r["optim"]["lr_scaling"] = "linear"
    assert load_config(r).optim.resolved_lr(4) == pytest.approx(1e-3 * 4 / 256)


# ---------------------------------------------------------------- 2. optimizers


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_sgd_and_lars_train(name, shards, tmp_path):
    r = recipe(shards, optim={"name": name, "lr": 0.05, "momentum": 0.9})
    cfg = load_config(r)
    opt = build_optimizer(build_method(cfg).param_groups(0.05), cfg.optim, 0.05)
    from timm.optim import Lars

    assert type(opt) is {"sgd": torch.optim.SGD, "lars": Lars}[name]
    assert opt.param_groups[0]["momentum"] == 0.9
    res = pretrain(r, run_dir=tmp_path / "run")
    assert res.steps == 3 and all(math.isfinite(m["loss"]) for m in res.metrics)
    start, end = initial_weights(r), final_checkpoint(tmp_path / "run")["model"]
    assert all(torch.isfinite(v).all() for v in end.values())
    assert not torch.equal(start["encoder.blocks.0.attn.qkv.weight"], end["encoder.blocks.0.attn.qkv.weight"])


def test_lr_mult_zero_freezes_the_patch_embedding(shards, tmp_path):
    r = recipe(shards, optim={"lr_mult": {"*patch_embed*": 0.0}})
    start = initial_weights(r)
    pretrain(r, run_dir=tmp_path / "run")
    end = final_checkpoint(tmp_path / "run")["model"]
    frozen = [k for k in start if "patch_embed" in k]
    assert frozen == ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    assert all(torch.equal(start[k], end[k]) for k in frozen)
    moved = [k for k in start if "patch_embed" not in k and not torch.equal(start[k], end[k])]
    assert "encoder.blocks.0.attn.qkv.weight" in moved and "decoder.decoder_pred.weight" in moved


def test_an_lr_mult_pattern_that_matches_nothing_is_a_config_error(shards, tmp_path):
    r = recipe(shards, optim={"lr_mult": {"*patch_embed*": 0.5, "*no_such_layer*": 0.1}})
    with pytest.raises(ConfigError, match=r"optim\.lr_mult pattern '\*no_such_layer\*' matches no trainable parameter"):
        pretrain(r, run_dir=tmp_path / "run")


# ---------------------------------------------------------------- 3. init_from


@pytest.fixture
def published_source():
    src = zoo.create_model("vit_nano_patch4_32", pos_embed="sincos", **TINY)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    zoo.publish(src, "vit_nano_patch4_32.src")
    return {k: v.clone() for k, v in src.state_dict().items()}


def test_init_from_starts_the_backbone_from_published_weights(published_source, shards, tmp_path):
    r = recipe(shards, steps=2, optim={"lr": 1e-9, "weight_decay": 0.0}, init_from="vit_nano_patch4_32.src")
    trainer = Trainer(r, run_dir=tmp_path / "init")
    try:
        before = {k: v.clone() for k, v in trainer.method.backbone().state_dict().items()}
        assert before and before.keys() <= published_source.keys()  # the source's classifier is dropped
        assert all(torch.equal(before[k], published_source[k]) for k in before)
        trainer.fit()
    finally:
        trainer.close()
    assert trainer.finish().steps == 2
    trained = final_checkpoint(tmp_path / "init")["model"]
    assert max((trained[f"encoder.{k}"] - v).abs().max().item() for k, v in before.items()) < 1e-6

    plain = initial_weights(recipe(shards, steps=2))  # the same run without init_from
    assert max((plain[f"encoder.{k}"] - before[k]).abs().max().item() for k in before if "pos_embed" not in k) > 0.5


def test_init_from_an_unknown_name_is_a_one_line_config_error(shards, tmp_path):
    r = recipe(shards, init_from="vit_nano_patch4_32.nothing")
    with pytest.raises(ConfigError) as e:
        pretrain(r, run_dir=tmp_path / "run")
    assert str(e.value).startswith("init_from: ") and "'vit_nano_patch4_32.nothing'" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- 4. built-in data


def test_builtin_data_is_generated_once_and_trained_on(isolated_zoo_home, tmp_path):
    r = recipe(None, steps=2, data={"builtin": "fractals", "builtin_n": N})
    res = pretrain(r, run_dir=tmp_path / "a")
    assert res.steps == 2 and (tmp_path / "a" / "done.json").is_file()
    data = isolated_zoo_home / "data"
    folders = sorted(p.name for p in data.iterdir())
    assert folders == [f"fractals-train-n{N}-32px-seed0"]  # no partial folder left behind
    made = data / folders[0]
    assert json.loads((made / "sizes.json").read_text()) and len(list(made.glob("*.tar"))) == 8
    stamps = {p.name: p.stat().st_mtime_ns for p in made.iterdir()}
    assert json.loads((tmp_path / "a" / "done.json").read_text())["steps"] == 2

    assert pretrain(r, run_dir=tmp_path / "b").steps == 2
    assert sorted(p.name for p in data.iterdir()) == folders
    assert {p.name: p.stat().st_mtime_ns for p in made.iterdir()} == stamps  # reused, not rewritten


def test_no_data_and_no_builtin_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no training data: give --data"):
        pretrain(recipe(None), run_dir=tmp_path / "run")


# ---------------------------------------------------------------- 5. final evals, online kNN


def test_final_knn_goes_into_the_card_and_done_json(shards, tmp_path, isolated_zoo_home, monkeypatch):
    monkeypatch.setattr("zoo.engine.trainer.EVAL_BUILTIN_N", 200)  # a smaller digits set than the whole split
    r = recipe(shards, steps=4, eval={"train": "builtin:digits", "val": "builtin:digits", "final": ["knn"],
                                      "every": 2, "k": 5},
               output={"checkpoint_every": 0, "log_every": 1, "tensorboard": False,
                       "publish": "vit_nano_patch4_32.contract_test"})
    res = pretrain(r, run_dir=tmp_path / "run")
    assert [m["step"] for m in res.metrics if "knn_top1" in m] == [2, 4]
    top1 = res.evals["digits"]["knn_top1"]
    assert 0.0 <= top1 <= 100.0
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["eval"]["digits"]["knn_top1"] == top1
    name = "vit_nano_patch4_32.contract_test"
    assert done["published"] == {name: str(res.published[name])}
    from zoo.hub import read_card

    assert read_card("vit_nano_patch4_32.contract_test")["eval"]["digits"]["knn_top1"] == top1
    model = zoo.load("vit_nano_patch4_32.contract_test")
    assert model.zoo_card["eval"]["digits"]["knn_top1"] == top1
    assert model.zoo_card["provenance"]["steps"] == 4 and model.zoo_card["provenance"]["recipe"] == "mae"
    assert sorted(p.name for p in (isolated_zoo_home / "data").iterdir()) == \
        ["digits-train-n200-32px-seed0", "digits-val-n200-32px-seed0"]


def test_final_evals_run_once_on_the_backbone_and_on_each_other_exported_image_backbone(monkeypatch):
    """POA exports several sizes: each is evaluated into its own card; the backbone is not evaluated twice,
    whatever name it is published under, and a model that is not an image backbone (a whole CLIP) is skipped."""
    from types import SimpleNamespace

    from zoo.engine.contract import Export

    calls = []

    def fake_evaluate(model, train, val, **kw):
        calls.append(model)
        return {"knn_top1": float(len(calls))}

    monkeypatch.setattr("zoo.eval.protocols.evaluate", fake_evaluate)
    backbone, small = zoo.create_model("vit_nano_patch4_32", **TINY), zoo.create_model("vit_nano_patch4_32", depth=1)
    method = SimpleNamespace(backbone=lambda: backbone)
    cfg = load_config(recipe("unused", eval={"train": "builtin:digits", "val": "builtin:digits", "final": ["knn"]}))
    trainer = SimpleNamespace(cfg=cfg, _eval_data=lambda: ("train", "val"))
    exports = {"vit_nano_patch4_32.a": Export(backbone), "vit_nano_patch4_32.a_small": Export(small),
               "clip_nano_patch4_32.a": Export(nn.Linear(2, 2))}
    main, per_export = Trainer.final_evals(trainer, method, exports)
    assert calls == [backbone, small]
    assert main == {"digits": {"knn_top1": 1.0}}
    assert per_export == {"vit_nano_patch4_32.a": main, "vit_nano_patch4_32.a_small": {"digits": {"knn_top1": 2.0}}}


# ---------------------------------------------------------------- 6. export names


class WrongExport(Method):
    """Exports its ViT (or `model`) under fixed names, whatever `output.publish` says."""

    def __init__(self, *names: str, model: nn.Module | None = None):
        super().__init__()
        self.vit = model if model is not None else zoo.create_model("vit_nano_patch4_32", **TINY)
        self.names = names or ("wrong_arch.tag",)

    def backbone(self) -> nn.Module:
        return self.vit

    def export(self, name):
        return {n: self.vit for n in self.names}


def test_an_export_named_after_another_arch_is_a_config_error(tmp_path, isolated_zoo_home):
    cfg = load_config(recipe("unused", output={"publish": "vit_nano_patch4_32.mine"}))
    with pytest.raises(ConfigError, match=r"WrongExport exports 'wrong_arch\.tag', but that model is vit_nano_patch4_32"
                                          r".*set output\.publish to 'vit_nano_patch4_32\.mine'"):
        publish_exports(WrongExport(), cfg, steps=1)
    with pytest.raises(ConfigError, match=r"not a zoo model; export models built with zoo\.create_model"):
        publish_exports(WrongExport("vit_nano_patch4_32.mine", model=nn.Linear(2, 2)), cfg, steps=1)
    with pytest.raises(ConfigError, match=r"exports 'wrong_arch\.tag'"):  # one bad name among several...
        publish_exports(WrongExport("vit_nano_patch4_32.mine", "wrong_arch.tag"), cfg, steps=1)
    assert zoo.hub.store_names() == []  # ...and none of them was published
    out = publish_exports(WrongExport("vit_nano_patch4_32.mine"), cfg, steps=1)  # the right name publishes
    assert list(out) == ["vit_nano_patch4_32.mine"]
    assert zoo.load("vit_nano_patch4_32.mine").zoo_arch == "vit_nano_patch4_32"
    assert publish_exports(WrongExport(), load_config(recipe("unused")), steps=1) == {}  # no output.publish: nothing


# ---------------------------------------------------------------- 7. stable sample indices


@pytest.fixture
def labelled(tmp_path):
    """20 samples in 4 shards; sample 7 lacks its label (skipped, but its position still counts)."""
    samples = [{"__key__": f"{i:09d}", **({"caption": "no label"} if i == 7 else {"label": i % 3})} for i in range(20)]
    write_shards(samples, tmp_path / "labelled", maxcount=5)
    return tmp_path / "labelled"


def keyed_indices(urls, **kw) -> list[tuple[str, int]]:
    return [(s["__key__"], s["__index__"]) for s in loader(urls, fields=("label",), batch_size=None, index=True, **kw)]


def test_index_is_the_same_every_epoch_and_splits_across_ranks(labelled):
    urls = str(labelled / "{00000..00003}.tar")
    data = loader(urls, fields=("label",), batch_size=None, shuffle=100, index=True, seed=1)
    epochs = [[(s["__key__"], s["__index__"]) for s in data] for _ in range(2)]
    assert [k for k, _ in epochs[0]] != [k for k, _ in epochs[1]]  # shuffled differently...
    assert dict(epochs[0]) == dict(epochs[1])  # ...with the same index for each sample
    assert all(index == int(key) for key, index in epochs[0])  # shard offset + position in the shard
    assert sorted(i for _, i in epochs[0]) == [i for i in range(20) if i != 7]
    assert data.skipped == {"missing_label": 1}

    ranks = [keyed_indices(urls, shuffle=100, rank=r, world_size=2) for r in (0, 1)]
    a, b = ({i for _, i in rank} for rank in ranks)
    assert not a & b and a | b == set(range(20)) - {7}
    assert all(index == int(key) for rank in ranks for key, index in rank)

    batches = list(loader(urls, fields=("label",), batch_size=4, shuffle=100, index=True))
    assert all(torch.is_tensor(b["__index__"]) for b in batches)


def test_index_without_sizes_json_is_a_data_error(labelled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(labelled, copy)
    (copy / "sizes.json").unlink()
    (copy / "_info.json").unlink()  # timm's counts: the other place a sample count is read from
    assert list(loader(str(copy / "*.tar"), fields=("label",), batch_size=None))  # fine without index
    with pytest.raises(DataError, match="index=True needs each shard's sample count.*sizes.json"):
        loader(str(copy / "*.tar"), fields=("label",), batch_size=None, index=True)


# ---------------------------------------------------------------- 8. a collate that drops samples


def test_samples_a_collate_drops_are_counted(stub, shards, tmp_path):
    r = stub_recipe(stub, shards, steps=3, drop=1, index=True)
    res = pretrain(r, run_dir=tmp_path / "run")
    assert res.steps == 3
    assert res.skipped["dropped_by_collate"] == 3  # one per batch
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["skipped"]["dropped_by_collate"] == 3
    # the method's index=True reaches training_step: 3 samples a batch, distinct dataset positions
    seen = [m[f"index_{i}"] for m in res.metrics for i in range(4) if f"index_{i}" in m]
    assert len(seen) == 9 and len(set(seen)) == 9 and all(0 <= i < N and i == int(i) for i in seen)


# ---------------------------------------------------------------- 9. `.pth` fields


class Payload:
    """A custom class: unpickling it needs this module's code, which weights_only=True refuses."""

    def __init__(self):
        self.secret = 42


class Boom:
    """Unpickled without weights_only, it would create a directory: proof that nothing was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pth_fields_round_trip_and_pickled_objects_are_refused(tmp_path):
    embs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    pairs = [{"a": e, "b": e.sum(0)} for e in embs[:2]]
    samples = [{"__key__": f"{i:09d}", "label": i, "emb": e} for i, e in enumerate(embs)]
    samples += [{"__key__": f"{i + 6:09d}", "label": i, "pair": p} for i, p in enumerate(pairs)]
    marker = tmp_path / "executed"
    for i, obj in enumerate([Payload(), Boom(str(marker))]):
        buf = io.BytesIO()
        torch.save(obj, buf)
        samples.append({"__key__": f"{i + 8:09d}", "__members__": {"cls": b"0", "emb.pth": buf.getvalue()}})
    write_shards(samples, tmp_path / "emb", maxcount=100)
    with tarfile.open(tmp_path / "emb" / "00000.tar") as tar:
        names = tar.getnames()
    assert "000000000.emb.pth" in names and "000000006.pair.pth" in names  # a dict of tensors is a .pth too

    data = loader(str(tmp_path / "emb" / "00000.tar"), fields=("emb",), batch_size=None, shuffle=0)
    got = {s["__key__"]: s["emb"] for s in data}
    assert sorted(got) == [f"{i:09d}" for i in range(6)]
    assert all(torch.equal(got[f"{i:09d}"], e) for i, e in enumerate(embs))
    assert data.skipped == {"missing_emb": 2, "undecodable_emb": 2}  # the pickled objects: skipped and counted
    assert not marker.exists()  # ... never executed

    pair = list(loader(str(tmp_path / "emb" / "00000.tar"), fields=("pair",), batch_size=None, shuffle=0))
    assert [s["__key__"] for s in pair] == ["000000006", "000000007"]
    assert all(torch.equal(s["pair"]["a"], p["a"]) and torch.equal(s["pair"]["b"], p["b"]) for s, p in zip(pair, pairs))

    torch.load(io.BytesIO(samples[-1]["__members__"]["emb.pth"]), weights_only=False)  # the control: it is live
    assert marker.is_dir()
