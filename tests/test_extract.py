"""`zoo extract`: a (width, depth) sub-network of an intact POA model (published, or a POA run directory's
latest checkpoint) published without retraining, its card, its refusals, and elastic families in `zoo list`."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.config import load_config, save_config
from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint
from zoo.engine.trainer import build_method
from zoo.errors import ConfigError, ZooError
from zoo.hub import read_card
from zoo.models.elastic import extract
from zoo.tools.extract import extract_and_publish, load_intact

INTACT = "vit_nano_patch4_32.poa"
SPACE = {"widths": [64, 96, 128], "depths": [3, 4, 5, 6], "width": 128, "depth": 6}
RECIPE = "poa_vit_nano_patch4_32_fractals"
TINY = ["schedule.steps=2", "schedule.warmup_steps=1", "optim.lr=1e-3", "data.batch_size=8", "data.builtin_n=32",
        "data.num_workers=0", "eval.final=[]", "eval.every=0", "output.log_every=1", "output.checkpoint_every=1",
        "output.plots=false", "output.tensorboard=false", "output.publish=vit_nano_patch4_32.poa_test",
        # smaller heads, no local crops, one elastic student: the intact 128 x 6 ViT and its space stay the recipe's
        "method.out_dims=[256]", "method.hidden_dim=128", "method.bottleneck_dim=64", "method.n_local_crops=0",
        "method.elastic_per_step=1"]


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def intact() -> torch.nn.Module:
    """An intact 128 x 6 zoo ViT published with the card a POA run gives its intact model."""
    vit = zoo.create_model("vit_nano_patch4_32", depth=6, init_values=0.5)
    zoo.publish(vit, INTACT, {"recipe": "poa", "data": "builtin:fractals (n=32)", "steps": 7, "elastic": SPACE})
    return zoo.load(INTACT)


def test_extract_by_name_publishes_the_sliced_sub_network(intact, capsys):
    assert main(["extract", INTACT, "--width", "64", "--depth", "4"]) == 0
    name = f"{INTACT}_w64_d4"
    assert f"published {name}" in capsys.readouterr().out
    sub = zoo.load(name)
    expected = extract(intact, 64, 4).eval()
    assert sub.embed_dim == 64 and len(sub.blocks) == 4
    assert_same_weights(sub, expected)
    with torch.no_grad():
        torch.testing.assert_close(sub.forward_features(images()), expected.forward_features(images()), rtol=0, atol=0)
    card = sub.zoo_card
    assert card["elastic"] == {"width": 64, "depth": 4, "block_ids": [0, 1, 3, 5], "parent_width": 128,
                               "parent_depth": 6, "parent": INTACT, "trained": True}
    prov = card["provenance"]
    assert (prov["recipe"], prov["data"], prov["steps"]) == ("poa", "builtin:fractals (n=32)", 7)
    assert prov["extracted_from"] == INTACT
    assert prov["parent_weights_sha256"] == read_card(INTACT)["weights_sha256"]
    assert card["eval"] == {}  # the parent's results do not carry over to a smaller model


def test_python_api_folder_source_name_root_and_overwrite(intact, tmp_path, isolated_zoo_home):
    folder = isolated_zoo_home / "models" / INTACT
    out = tmp_path / "published"
    path = extract_and_publish(folder, 96, 3, name="vit_nano_patch4_32.poa_small", root=out)
    assert path == out / "vit_nano_patch4_32.poa_small" and not (isolated_zoo_home / "models" / path.name).exists()
    assert_same_weights(zoo.load(path), extract(intact, 96, 3))
    assert read_card(path)["elastic"]["parent"] == INTACT  # a folder in the store is named by its name
    with pytest.raises(ZooError, match="already exists"):
        extract_and_publish(folder, 96, 3, name="vit_nano_patch4_32.poa_small", root=out)
    extract_and_publish(folder, 64, 3, name="vit_nano_patch4_32.poa_small", root=out, overwrite=True)
    assert read_card(path)["elastic"]["width"] == 64
    copy = tmp_path / "elsewhere" / "intact"
    shutil.copytree(folder, copy)
    path = extract_and_publish(copy, 64, 3)  # a folder outside the store: named by its path, default name from its card
    assert path.name == f"{INTACT}_w64_d3" and read_card(path)["elastic"]["parent"] == str(copy.resolve())


@pytest.mark.parametrize("width, depth, message", [
    ("100", "3", "width 100 is not a positive multiple of the head size 32; valid widths: 32, 64, 96, 128"),
    ("160", "3", "width 160 exceeds the intact model's 128; valid widths: 32, 64, 96, 128"),
    ("64", "7", "depth 7 is outside 1..6; valid depths: 1, 2, ..., 6"),
])
def test_invalid_size_is_a_one_line_error_with_the_range(intact, capsys, width, depth, message):
    assert main(["extract", INTACT, "--width", width, "--depth", depth]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == f"zoo: error: {INTACT}: {message}"
    assert zoo.list_models(f"{INTACT}_w*", pretrained=True) == []


def test_size_outside_the_trained_space_warns_and_says_so(intact, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="zoo.tools.extract"):
        assert main(["extract", INTACT, "--width", "32", "--depth", "2"]) == 0
    assert "w32 d2 is a valid slice" in caplog.text and "never trained" in caplog.text and "[64, 96, 128]" in caplog.text
    assert read_card(f"{INTACT}_w32_d2")["elastic"]["trained"] is False
    assert_same_weights(zoo.load(f"{INTACT}_w32_d2"), extract(intact, 32, 2))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoo.tools.extract"):
        assert main(["extract", INTACT, "--width", "128", "--depth", "5"]) == 0  # a trained pair
    assert "never trained" not in caplog.text
    capsys.readouterr()
    assert main(["list", f"{INTACT}_w*"]) == 0
    out = capsys.readouterr().out
    assert "(w32 d2 of w128 d6, untrained)" in out and "(w128 d5 of w128 d6)" in out


def test_non_poa_sources_are_refused_clearly(intact, tmp_path, capsys):
    zoo.publish(zoo.create_model("vit_nano_patch4_32"), "vit_nano_patch4_32.mae", {"recipe": "mae"})
    assert main(["extract", "vit_nano_patch4_32.mae", "--width", "64", "--depth", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vit_nano_patch4_32.mae is not an intact POA model" in err
    assert "elastic.widths" in err

    main(["extract", INTACT, "--width", "64", "--depth", "3"])
    capsys.readouterr()
    assert main(["extract", f"{INTACT}_w64_d3", "--width", "32", "--depth", "2"]) == 2
    err = capsys.readouterr().err
    assert "is itself a sub-network (w64 d3)" in err and f"extract from the intact model {INTACT}" in err

    dino_run = tmp_path / "dino_run"
    save_config(load_config("dino_vit_tiny_patch4_32_fractals"), dino_run / "config.yaml")
    assert main(["extract", str(dino_run), "--width", "64", "--depth", "2"]) == 2
    assert "is a dino run, not a POA run" in capsys.readouterr().err

    poa_run = tmp_path / "poa_run"
    save_config(load_config(RECIPE), poa_run / "config.yaml")
    assert main(["extract", str(poa_run), "--width", "64", "--depth", "3"]) == 2
    assert "holds no checkpoint yet" in capsys.readouterr().err

    assert main(["extract", str(tmp_path), "--width", "64", "--depth", "3"]) == 2
    assert "neither a published model folder" in capsys.readouterr().err
    assert main(["extract", "vit_nano_patch4_32.poa_typo", "--width", "64", "--depth", "3"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_extract_from_a_poa_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    result = zoo.pretrain(RECIPE, run_dir=run, overrides=TINY)
    assert result.steps == 2 and "vit_nano_patch4_32.poa_test_w64_d3" in result.published
    ckpt = latest_checkpoint(run)
    cfg = load_config(RECIPE, TINY)
    method = build_method(cfg)
    method.load_state_dict(load_checkpoint(ckpt)["model"])
    teacher = method.backbone().eval()

    assert main(["extract", str(run), "--width", "96", "--depth", "3"]) == 0
    name = "vit_nano_patch4_32.poa_test_w96_d3"  # output.publish + _w96_d3
    assert f"published {name}" in capsys.readouterr().out
    sub = zoo.load(name)
    assert_same_weights(sub, extract(teacher, 96, 3))
    card = sub.zoo_card
    assert card["elastic"] == {"width": 96, "depth": 3, "block_ids": [0, 2, 5], "parent_width": 128, "parent_depth": 6,
                               "parent": str(run.resolve()), "trained": True}
    assert card["provenance"]["recipe"] == "poa" and card["provenance"]["steps"] == 2
    assert card["provenance"]["data"] == "builtin:fractals (n=32)"
    assert card["provenance"]["extracted_from"] == str(ckpt.resolve())

    # the size the run itself exported, cut again from the run and from the published intact model: same weights
    assert main(["extract", str(run), "--width", "64", "--depth", "3", "--name", "vit_nano_patch4_32.again"]) == 0
    assert main(["extract", "vit_nano_patch4_32.poa_test", "--width", "64", "--depth", "3",
                 "--name", "vit_nano_patch4_32.again2"]) == 0
    exported = zoo.load("vit_nano_patch4_32.poa_test_w64_d3")
    assert_same_weights(zoo.load("vit_nano_patch4_32.again"), exported)
    assert_same_weights(zoo.load("vit_nano_patch4_32.again2"), exported)
    assert load_intact(run).space == read_card("vit_nano_patch4_32.poa_test")["elastic"]

    capsys.readouterr()
    assert main(["list", "vit_nano_patch4_32.poa_test*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        "vit_nano_patch4_32.poa_test", "vit_nano_patch4_32.poa_test_w64_d3", "vit_nano_patch4_32.poa_test_w96_d3",
        "vit_nano_patch4_32.poa_test_w96_d6"]
    assert "poa (intact w128 d6)" in lines[1] and "poa (w96 d3 of w128 d6)" in lines[3]

    # a run without output.publish has no default name
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    save_config(load_config(bare / "config.yaml", ["output.publish=null"]), bare / "config.yaml")
    with pytest.raises(ConfigError, match="no default name; pass --name"):
        extract_and_publish(bare, 64, 3)
    assert extract_and_publish(bare, 64, 3, name="vit_nano_patch4_32.bare").name == "vit_nano_patch4_32.bare"


def test_list_shows_an_elastic_family_together(intact, capsys):
    zoo.publish(zoo.create_model("vit_nano_patch4_32"), f"{INTACT}2", {"recipe": "mae"})  # sorts inside the family by name
    for width, depth in (("96", "4"), ("64", "3"), ("128", "3")):
        assert main(["extract", INTACT, "--width", width, "--depth", depth]) == 0
    capsys.readouterr()
    assert main(["list", f"{INTACT}*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PARAMS", "SOURCE", "RECIPE", "EVAL"]
    rows = [line.split()[0] for line in lines[1:]]
    assert rows == [INTACT, f"{INTACT}_w64_d3", f"{INTACT}_w96_d4", f"{INTACT}_w128_d3", f"{INTACT}2"]
    assert "poa (intact w128 d6)" in lines[1] and "poa (w64 d3 of w128 d6)" in lines[2]
    assert lines[5].split()[3] == "mae"

    assert main(["list", f"{INTACT}*", "--json"]) == 0
    by_name = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert by_name[INTACT]["elastic"] == SPACE and by_name[INTACT]["recipe"] == "poa"
    assert by_name[f"{INTACT}_w64_d3"]["elastic"] == {"width": 64, "depth": 3, "block_ids": [0, 2, 5],
                                                      "parent_width": 128, "parent_depth": 6, "parent": INTACT,
                                                      "trained": True}
    assert by_name[f"{INTACT}2"]["elastic"] is None
