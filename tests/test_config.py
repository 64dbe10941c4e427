"""zoo.config: recipe YAML -> validated RunConfig, dotted overrides, save/load round trip, one-line errors."""

from __future__ import annotations

import textwrap

import pytest

from zoo.config import (
    DataConfig, EvalConfig, MethodConfig, ModelConfig, OptimConfig, OutputConfig, RunConfig, ScheduleConfig,
    load_config, save_config, to_dict, validate_method_args,
)
from zoo.errors import ConfigError, ZooError

FULL = textwrap.dedent("""\
    method:
      name: mae
      mask_ratio: 0.75
      norm_pix_loss: true
      decoder_dim: 128
      decoder_depth: 2
    model:
      arch: vit_tiny_patch4_32
      drop_path_rate: 0.0
    data:
      train: shards/train-{00000..00015}.tar
      batch_size: 128
      num_workers: 2
      resampled: true
      epoch_samples: 20000
    optim:
      blr: 1.5e-4
      weight_decay: 0.05
      betas: [0.9, 0.95]
      clip_grad: 1
      accum_steps: 2
    schedule:
      epochs: 50
      warmup_frac: 0.1
      min_lr: 1e-6
    eval:
      train: data/digits/train/*.tar
      val: data/digits/val/*.tar
      every: 500
      k: 10
      final: [knn, linear]
    output:
      dir: runs/{name}
      name: mae_tiny_fractals
      publish: vit_tiny_patch4_32.mae_fractal
      checkpoint_every: 1000
    seed: 3
    amp: bf16
    compile: false
    device: cpu
""")

MINIMAL = {"method": {"name": "mae"}, "model": {"arch": "vit_tiny_patch4_32"}, "schedule": {"steps": 100}}


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(source=MINIMAL, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    msg = str(info.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


# ---------------------------------------------------------------- loading and round trip


def test_full_recipe_loads_typed(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.method == MethodConfig("mae", {"mask_ratio": 0.75, "norm_pix_loss": True, "decoder_dim": 128,
                                              "decoder_depth": 2})
    assert cfg.model == ModelConfig("vit_tiny_patch4_32", {"drop_path_rate": 0.0})
    assert cfg.data.train == "shards/train-{00000..00015}.tar" and cfg.data.resampled is True
    assert cfg.optim.betas == (0.9, 0.95)  # list -> tuple
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)  # int accepted for a float
    assert cfg.schedule.min_lr == 1e-6 and isinstance(cfg.schedule.min_lr, float)  # 1e-6 without a dot
    assert cfg.schedule.epochs == 50.0 and cfg.schedule.steps is None
    assert cfg.eval.final == ["knn", "linear"]
    assert (cfg.seed, cfg.amp, cfg.compile, cfg.device) == (3, "bf16", False, "cpu")
    assert cfg.output.run_dir("x").as_posix() == "runs/mae_tiny_fractals"


def test_round_trip_file_and_dict(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert saved.is_file()
    assert load_config(saved) == cfg
    assert load_config(to_dict(cfg)) == cfg
    assert load_config(cfg) == cfg  # a RunConfig is accepted too
    again = load_config(save_config(load_config(MINIMAL), tmp_path / "min.yaml"))
    assert again == load_config(MINIMAL)


def test_method_and_model_args_stay_inline_when_saved(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    d = to_dict(cfg)
    assert d["method"] == {"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True, "decoder_dim": 128,
                           "decoder_depth": 2}
    assert d["optim"]["betas"] == [0.9, 0.95]


def test_amp_no_survives_yaml_booleans(tmp_path):
    # YAML 1.1 reads a bare `no` as false; for amp it means the string 'no'
    cfg = load_config(write(tmp_path, "method: {name: mae}\nmodel: {arch: a}\nschedule: {steps: 1}\namp: no\n"))
    assert cfg.amp == "no"
    assert "amp: 'no'" in save_config(cfg, tmp_path / "out.yaml").read_text()
    assert load_config(MINIMAL, ["amp=no"]).amp == "no"


def test_strings_that_look_like_numbers_round_trip(tmp_path):
    cfg = load_config(MINIMAL, ["output.name='1e-3'", "method.tag='1e5'", "method.lr=1e-3"])
    assert cfg.output.name == "1e-3" and cfg.method.args == {"tag": "1e5", "lr": 1e-3}
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_overrides_none_is_no_overrides():
    assert load_config(MINIMAL, None) == load_config(MINIMAL)  # argparse's append action gives None


def test_defaults_filled():
    cfg = load_config(MINIMAL)
    assert cfg.method.args == {} and cfg.model.args == {}
    assert cfg.data == DataConfig()
    assert cfg.data.batch_size == 64 and cfg.data.train is None and cfg.data.shuffle == 1000
    assert cfg.optim == OptimConfig()
    assert cfg.optim.lr is None and cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.resolved_lr(512) == pytest.approx(3e-4)  # MAE rule: blr * global_batch / 256
    assert cfg.schedule == ScheduleConfig(steps=100)
    assert cfg.schedule.kind == "cosine" and cfg.schedule.warmup(100) == 0
    assert cfg.eval == EvalConfig() and cfg.eval.every == 0
    assert cfg.output == OutputConfig() and cfg.output.run_dir("mae").as_posix() == "runs/mae"
    assert (cfg.seed, cfg.amp, cfg.compile, cfg.device) == (0, "no", False, "auto")


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "method: {name: mae}\nmodel: {arch: a}\nschedule: {steps: 1}\neval:\n"))
    assert cfg.eval == EvalConfig()


def test_warmup_helpers():
    assert ScheduleConfig(steps=100, warmup_frac=0.1).warmup(100) == 10
    assert ScheduleConfig(epochs=2, warmup_steps=5).warmup(1000) == 5


def test_input_dict_is_not_mutated():
    src = {"method": {"name": "mae"}, "model": {"arch": "a"}, "schedule": {"steps": 1}}
    load_config(src, ["method.mask_ratio=0.9", "optim.lr=1e-3"])
    assert src == {"method": {"name": "mae"}, "model": {"arch": "a"}, "schedule": {"steps": 1}}


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        OptimConfig(lr="fast")
    cfg = RunConfig(method={"name": "mae"}, model={"arch": "a"}, schedule={"steps": 5})
    assert cfg == load_config({"method": {"name": "mae"}, "model": {"arch": "a"}, "schedule": {"steps": 5}})


# ---------------------------------------------------------------- overrides


def test_overrides_of_typed_fields_are_yaml_typed():
    cfg = load_config(MINIMAL, ["optim.lr=1e-3", "schedule.steps=200", "data.resampled=true",
                                "optim.betas=[0.8, 0.99]", "eval.final=[linear]", "output.publish=vit_t.mae",
                                "seed=7", "optim.clip_grad=null", "data.train=shards/{0..3}.tar"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.steps == 200
    assert cfg.data.resampled is True
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.eval.final == ["linear"]
    assert cfg.output.publish == "vit_t.mae"
    assert cfg.seed == 7 and cfg.optim.clip_grad is None
    assert cfg.data.train == "shards/{0..3}.tar"


def test_overrides_of_free_form_args():
    cfg = load_config(MINIMAL, ["method.mask_ratio=0.9", "method.norm_pix_loss=true", "model.depth=4",
                                "model.img_size=[1,2]", "method.lr_scale=1e-3", "model.extra.nested=x"])
    assert cfg.method.name == "mae"
    assert cfg.method.args == {"mask_ratio": 0.9, "norm_pix_loss": True, "lr_scale": 1e-3}
    assert isinstance(cfg.method.args["lr_scale"], float)
    assert cfg.model.args == {"depth": 4, "img_size": [1, 2], "extra": {"nested": "x"}}


def test_overrides_as_mapping_and_later_wins():
    cfg = load_config(MINIMAL, {"optim.lr": 0.01, "method.mask_ratio": 0.5})
    assert cfg.optim.lr == 0.01 and cfg.method.args == {"mask_ratio": 0.5}
    assert load_config(MINIMAL, ["optim.lr=1", "optim.lr=2"]).optim.lr == 2.0


def test_override_switches_steps_to_epochs():
    cfg = load_config(MINIMAL, ["schedule.steps=null", "schedule.epochs=1.5"])
    assert cfg.schedule.steps is None and cfg.schedule.epochs == 1.5


# ---------------------------------------------------------------- errors


def test_errors_are_zoo_errors():
    assert issubclass(ConfigError, ZooError)


def test_unknown_key_in_typed_section_suggests_closest():
    assert error(overrides=["optim.lrr=1e-3"]) == "unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    assert "did you mean 'data.batch_size'?" in error({**MINIMAL, "data": {"batchsize": 8}})
    assert "did you mean 'schedule.warmup_steps'?" in error(overrides=["schedule.warmup_step=3"])
    assert "'output.zzz'" in error(overrides=["output.zzz=1"])  # no close name: lists the valid ones
    assert "valid: dir, name, publish" in error(overrides=["output.zzz=1"])


def test_unknown_top_level_section():
    msg = error({**MINIMAL, "optm": {"lr": 1.0}})
    assert "unknown key 'optm'" in msg and "did you mean 'optim'?" in msg
    assert "did you mean 'seed'?" in error(overrides=["sed=1"])


def test_wrong_types():
    assert error(overrides=["optim.lr=fast"]) == "optim.lr must be a number, got 'fast'"
    assert error(overrides=["optim.lr=true"]) == "optim.lr must be a number, got true"  # bools are not numbers
    assert "data.batch_size must be an integer, got 8.5" in error(overrides=["data.batch_size=8.5"])
    assert "data.resampled must be true or false, got 'yes please'" in error(overrides=["data.resampled=yes please"])
    assert "optim.betas must be a list of 2 numbers" in error(overrides=["optim.betas=[0.9]"])
    assert "optim.betas[1] must be a number, got 'x'" in error(overrides=["optim.betas=[0.9, x]"])
    assert "optim must be a mapping, got 3" in error(overrides=["optim=3"])
    assert "output.name must be a string, got 2024 (quote it in YAML)" in error(overrides=["output.name=2024"])


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "method: {name: mae}\nmodel: {arch: a}\nschedule: {steps: 1}\noptim: {lr: fast}\n")
    assert error(path) == "optim.lr must be a number, got 'fast'"


def test_literal_choices_suggest_closest():
    msg = error(overrides=["amp=bf61"])
    assert "amp must be one of 'no', 'bf16'" in msg and "did you mean 'bf16'?" in msg
    assert "did you mean 'cuda'?" in error(overrides=["device=cdua"])
    assert "did you mean 'knn'?" in error(overrides=["eval.final=[knnn]"])
    assert "eval.final[0]" in error(overrides=["eval.final=[knnn]"])


def test_missing_required():
    msg = error({"model": {"arch": "a"}, "schedule": {"steps": 1}})
    assert "missing required key 'method.name'" in msg and "--set method.name=" in msg
    assert "missing required key 'method.name'" in error({"method": {"mask_ratio": 0.5}, "model": {"arch": "a"},
                                                          "schedule": {"steps": 1}})
    assert "missing required key 'model.arch'" in error({"method": {"name": "mae"}, "schedule": {"steps": 1}})


def test_schedule_needs_exactly_one_of_steps_and_epochs():
    neither = error({"method": {"name": "mae"}, "model": {"arch": "a"}})
    assert "exactly one of 'schedule.steps' or 'schedule.epochs'" in neither and "neither" in neither
    both = error(overrides=["schedule.epochs=2"])
    assert "exactly one of" in both and "both" in both
    assert "only one of 'schedule.warmup_steps' and 'schedule.warmup_frac'" in error(
        overrides=["schedule.warmup_steps=2", "schedule.warmup_frac=0.1"])


def test_out_of_range_values():
    assert error(overrides=["optim.lr=-1e-3"]) == "optim.lr must be > 0 or null, got -0.001"
    assert "data.batch_size must be >= 1, got 0" in error(overrides=["data.batch_size=0"])
    assert "optim.betas must be two numbers in [0, 1)" in error(overrides=["optim.betas=[0.9, 1.5]"])
    assert load_config(MINIMAL, ["schedule.warmup_steps=101"]).schedule.warmup(100) == 100  # clamped to the run
    assert "output.publish must be a zoo name 'arch.tag'" in error(overrides=["output.publish=notag"])
    assert "output.dir may only use '{name}'" in error(overrides=["output.dir=runs/{date}"])


def test_free_form_args_may_not_shadow_typed_keys():
    with pytest.raises(ConfigError, match="method.args may not contain 'name'; set method.name instead"):
        MethodConfig("mae", {"name": "other"})


def test_malformed_overrides():
    assert "expected KEY=VALUE" in error(overrides=["optim.lr"])
    assert "expected KEY=VALUE" in error(overrides=["=3"])
    assert "expected KEY=VALUE" in error(overrides=["optim..lr=3"])
    assert "not valid YAML" in error(overrides=["model.img_size=[1,2"])
    assert "cannot set 'method.mask_ratio.x'" in error(overrides=["method.mask_ratio=0.5", "method.mask_ratio.x=1"])


def test_missing_file_suggests_sibling(tmp_path):
    write(tmp_path, FULL, "mae_fractals.yaml")
    msg = error(tmp_path / "mae_fractal.yaml")
    assert "does not exist" in msg and "mae_fractals.yaml" in msg
    assert "does not exist" in error(str(tmp_path / "nowhere" / "x.yaml"))


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "method:\n  name: mae\nmodel: {arch: a\nschedule: {steps: 1}\n")
    msg = error(path)
    assert "not valid YAML at line 4, column 9" in msg and str(path) in msg
    assert "flow mapping started at line 3" in msg
    assert "line 2" in error(write(tmp_path, "method: {name: mae}\n  model: 3\n", "indent.yaml"))
    msg = error(write(tmp_path, "method: {name: mae}\noptim:\n  lr: 1\n  lr: 2\n", "dup.yaml"))
    assert "duplicate key 'lr' at line 4" in msg
    assert "must hold a mapping" in error(write(tmp_path, "- a\n- b\n", "list.yaml"))


# ---------------------------------------------------------------- validate_method_args


class Explicit:
    def __init__(self, backbone=None, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
                 decoder_dim: int = 512, *, loss_kind: str = "mse"):
        pass


class Open:
    def __init__(self, mask_ratio: float = 0.75, **kwargs):
        pass


def factory(depth: int = 12, img_size: tuple[int, int] = (32, 32)):
    return depth, img_size


def test_validate_method_args_explicit_signature():
    out = validate_method_args(Explicit, {"mask_ratio": 1, "norm_pix_loss": True, "loss_kind": "l1"})
    assert out == {"mask_ratio": 1.0, "norm_pix_loss": True, "loss_kind": "l1"}
    assert isinstance(out["mask_ratio"], float)
    with pytest.raises(ConfigError) as info:
        validate_method_args(Explicit, {"mask_ration": 0.9})
    assert str(info.value) == ("unknown method arg 'method.mask_ration' for Explicit; did you mean 'method.mask_ratio'? "
                               "valid: backbone, mask_ratio, norm_pix_loss, decoder_dim, loss_kind")
    with pytest.raises(ConfigError, match="method.decoder_dim must be an integer, got 'big'"):
        validate_method_args(Explicit, {"decoder_dim": "big"})


def test_validate_method_args_kwargs_allows_anything():
    assert validate_method_args(Open, {"anything": 1, "mask_ratio": 0.5}) == {"anything": 1, "mask_ratio": 0.5}
    with pytest.raises(ConfigError, match="method.mask_ratio must be a number"):
        validate_method_args(Open, {"mask_ratio": "high"})


def test_validate_model_args_against_a_factory():
    assert validate_method_args(factory, {"depth": 4, "img_size": [16, 16]}, where="model") == {
        "depth": 4, "img_size": (16, 16)}
    with pytest.raises(ConfigError, match=r"did you mean 'model.depth'\?"):
        validate_method_args(factory, {"deph": 4}, where="model")


def test_validate_method_args_with_loaded_config():
    cfg = load_config(MINIMAL, ["method.mask_ratio=0.9", "method.norm_pix_loss=true"])
    assert validate_method_args(Explicit, cfg.method.args) == {"mask_ratio": 0.9, "norm_pix_loss": True}
