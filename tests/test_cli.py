"""The `zoo` command: list, info, errors, and the installed entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import zoo
import zoo.hub
from zoo.cli import main


def test_list_shows_architectures_and_published_models(capsys):
    zoo.publish(zoo.create_model("vit_nano_patch4_32"), "vit_nano_patch4_32.demo",
                {"recipe": "mae", "eval": {"digits": {"knn_top1": 91.25}}})
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PARAMS", "SOURCE", "RECIPE", "EVAL"]
    row = next(line for line in out.splitlines() if line.startswith("vit_nano_patch4_32.demo"))
    assert "store" in row and "mae" in row and "digits knn_top1 91.25" in row
    assert any(line.startswith("resnet18 ") for line in out.splitlines())
    assert any(line.startswith("vit_tiny_patch4_32 ") and "2.7M" in line for line in out.splitlines())


def test_list_pattern_and_json(capsys):
    assert main(["list", "vit_*_patch4_32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"vit_nano_patch4_32", "vit_tiny_patch4_32", "vit_small_patch4_32"}
    assert main(["list", "vit_*_patch4_32", "--pretrained"]) == 1  # empty store, no table entry: says so and fails
    assert "no model matches" in capsys.readouterr().err


def test_info_architecture_and_card(capsys):
    assert main(["info", "vit_tiny_patch4_32", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["params"] == sum(p.numel() for p in zoo.create_model("vit_tiny_patch4_32").parameters())
    assert rec["pretrained_cfg"]["input_size"] == [3, 32, 32]
    zoo.publish(zoo.create_model("vit_nano_patch4_32"), "vit_nano_patch4_32.card", {"data": "fractals", "steps": 10})
    assert main(["info", "vit_nano_patch4_32.card"]) == 0
    out = capsys.readouterr().out
    assert "arch: vit_nano_patch4_32" in out and "data: fractals" in out and "steps: 10" in out


def test_unknown_name_is_a_one_line_error(capsys):
    assert main(["info", "vit_tiny_patch4_23"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("zoo: error: unknown model") and "vit_tiny_patch4_32" in err


def test_installed_entry_point_runs():
    exe = shutil.which("zoo") or str(__import__("pathlib").Path(sys.executable).with_name("zoo"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "list" in out.stdout and "info" in out.stdout
    out = subprocess.run([sys.executable, "-m", "zoo", "list", "resnet*"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resnet50" in out.stdout


def test_shards_from_folder_then_check(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            p = tmp_path / "src" / cls / f"{i}.png"
            Image.fromarray(np.full((8, 8, 3), 50 * c + i, np.uint8)).save(p)
            if i == 0:
                p.with_suffix(".txt").write_text(f"a {cls}")
    assert main(["shards", "from-folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--maxcount", "4"]) == 0
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["num_samples"] == 6
    capsys.readouterr()
    assert main(["shards", "check", str(tmp_path / "out" / "*.tar")]) == 0
    out = capsys.readouterr().out
    assert "00000.tar  4" in out and "caption,image,label" in out
    from zoo.data import loader

    got = list(loader(str(tmp_path / "out" / "*.tar"), fields=("image", "label"), optional_fields=("caption",),
                      batch_size=None, shuffle=0))
    assert [s["label"] for s in got] == [0, 0, 0, 1, 1, 1]
    assert got[3]["caption"] == "a dog" and np.asarray(got[4]["image"])[0, 0, 0] == 51  # png bytes kept: lossless


def test_shards_check_fails_on_a_bad_shard(tmp_path, capsys):
    (tmp_path / "00000.tar").write_bytes(b"\0" * 100)  # not a tar
    assert main(["shards", "check", str(tmp_path / "*.tar")]) == 1
    assert "bad_tar" in capsys.readouterr().out
    assert main(["shards", "check", str(tmp_path / "nope-{0..3}.tar")]) == 2
    assert "shard not found" in capsys.readouterr().err


def test_make_builtin_then_check(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["shards", "make-builtin", "scenes", "--out", str(out), "--n", "120", "--maxcount", "50"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 50, "00001.tar": 50, "00002.tar": 20}
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "scenes" and info["num_samples"] == 120
    assert set(info["fields"]) == {"image", "label", "caption", "meta", "mask", "thermal", "depth"}
    capsys.readouterr()
    assert main(["shards", "check", str(out / "*.tar")]) == 0
    assert "0 problem(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_knn_and_linear_on_digits(tmp_path, capsys):
    """`zoo eval` end to end: built-in digits shards, a registered model with random weights."""
    for split in ("train", "val"):
        assert main(["shards", "make-builtin", "digits", "--split", split, "--n", "2000", "--out", str(tmp_path / split)]) == 0
    train, val = str(tmp_path / "train" / "*.tar"), str(tmp_path / "val" / "*.tar")
    capsys.readouterr()
    assert main(["eval", "knn", "vit_nano_patch4_32", "--train", train, "--val", val, "--k", "10", "20",
                 "--out", str(tmp_path / "knn.json")]) == 0
    res = json.loads((tmp_path / "knn.json").read_text())["results"]
    assert set(res) == {"top1_k10", "top5_k10", "top1_k20", "top5_k20"}
    assert res["top1_k10"] > 30.0  # even random ViT features separate digits well above 10% chance
    assert "RANDOM weights" in capsys.readouterr().err
    assert main(["eval", "linear", "vit_nano_patch4_32", "--train", train, "--val", val, "--epochs", "5",
                 "--out", str(tmp_path / "lin.json")]) == 0
    lin = json.loads((tmp_path / "lin.json").read_text())["results"]
    assert lin["top1"] > 40.0 and lin["best"]["features"] in {"cls", "cls+avg", "last4"}
    out = capsys.readouterr().out
    assert "VAL top1" in out and "heldout" in out


def test_eval_knn_on_a_named_label_field(tmp_path, capsys):
    """`--label-field fine`: a coarse dataset's fine classes (fine.cls members); a field no sample has is an error."""
    for split in ("train", "val"):
        assert main(["shards", "make-builtin", "digits_coarse", "--split", split, "--n", "300",
                     "--out", str(tmp_path / split)]) == 0
    train, val = str(tmp_path / "train" / "*.tar"), str(tmp_path / "val" / "*.tar")
    common = ["eval", "knn", "vit_nano_patch4_32", "--train", train, "--val", val, "--k", "10", "--no-cache"]
    assert main([*common, "--out", str(tmp_path / "coarse.json")]) == 0
    assert main([*common, "--label-field", "fine", "--out", str(tmp_path / "fine.json")]) == 0
    coarse = json.loads((tmp_path / "coarse.json").read_text())["results"]["top1_k10"]
    fine = json.loads((tmp_path / "fine.json").read_text())["results"]["top1_k10"]
    assert coarse != fine and fine > 20.0  # 10 digits, not the 5 super-classes
    capsys.readouterr()
    assert main([*common, "--label-field", "nope"]) != 0
    assert "'nope'" in capsys.readouterr().err


def test_eval_record_adds_results_to_the_card(tmp_path, capsys):
    zoo.publish(zoo.create_model("vit_nano_patch4_32"), "vit_nano_patch4_32.rec")
    for split in ("train", "val"):
        main(["shards", "make-builtin", "digits", "--split", split, "--n", "60", "--out", str(tmp_path / "digits" / split)])
    assert main(["eval", "knn", "vit_nano_patch4_32.rec", "--train", str(tmp_path / "digits/train/*.tar"),
                 "--val", str(tmp_path / "digits/val/*.tar"), "--k", "5", "--record", "--task", "digits"]) == 0
    card = zoo.hub.read_card("vit_nano_patch4_32.rec")
    assert set(card["eval"]["digits"]) == {"knn_top1_k5", "knn_top5_k5"}
    capsys.readouterr()
    main(["list", "vit_nano_patch4_32.rec"])
    assert "digits knn_top1_k5" in capsys.readouterr().out


def test_eval_dense_on_scenes(tmp_path, capsys):
    for split, n in (("train", 30), ("val", 10)):
        main(["shards", "make-builtin", "scenes", "--split", split, "--n", str(n), "--out", str(tmp_path / split)])
    assert main(["eval", "dense", "vit_nano_patch4_32", "--train", str(tmp_path / "train/*.tar"),
                 "--val", str(tmp_path / "val/*.tar"), "--epochs", "2", "--out", str(tmp_path / "d.json")]) == 0
    res = json.loads((tmp_path / "d.json").read_text())["results"]
    assert 0.0 <= res["mIoU"] <= 100.0 and "0" in res["per_class_iou"]
    assert "VAL mIoU" in capsys.readouterr().out


def test_eval_zeroshot_and_retrieval_on_scenes(tiny_open_clip, tmp_path, capsys):
    from conftest import TINY_CLIP

    main(["shards", "make-builtin", "scenes", "--split", "val", "--n", "24", "--out", str(tmp_path / "val")])
    val = str(tmp_path / "val" / "*.tar")
    model = f"open_clip:{TINY_CLIP}"
    assert main(["eval", "zeroshot", model, "--val", val, "--random-weights", "--out", str(tmp_path / "z.json")]) == 0
    z = json.loads((tmp_path / "z.json").read_text())
    from zoo.registry import DATASETS

    assert z["classes"] == list(DATASETS.get("scenes").meta["classes"])  # read from the shards' dataset.json
    assert set(z["results"]) == {"top1", "top5"}
    assert main(["eval", "retrieval", model, "--val", val, "--random-weights", "--caption", "exact", "short"]) == 0
    out = capsys.readouterr().out
    assert "image_to_text_R@1" in out and "text_to_image_R@10" in out
    assert main(["eval", "zeroshot", "vit_nano_patch4_32", "--val", val]) == 2
    assert "needs an image-text model" in capsys.readouterr().err


def test_info_kernels_says_what_runs_here_and_why_not(capsys, monkeypatch):
    monkeypatch.delenv("ZOO_ATTENTION", raising=False)
    assert main(["info", "--kernels", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    cpu = rec["attention on cpu (default: sdpa)"]
    assert cpu["sdpa"] == cpu["math"] == "available"
    assert "CUDA" in cpu["xformers"] and "CUDA" in cpu["flex"]
    assert rec["torch"] and "attention_kl" in rec
    assert main(["info"]) == 2
    assert "--kernels" in capsys.readouterr().err


def test_recipes_lists_every_method_with_its_yamls(capsys):
    from zoo.registry import RECIPES

    assert main(["recipes", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {e.name for e in RECIPES} >= {"mae", "clip", "dino"}
    assert rows["dino"]["recipes"] == ["dino_vit_tiny_patch4_32_fractals", "dino_vit_small_patch16_224"]  # CPU one first
    assert rows["mae"]["cpu_recipe"] == "mae_vit_tiny_patch4_32_fractals" and rows["dino"]["paper"].startswith("arXiv:")
    assert main(["recipes"]) == 0
    assert "dino_vit_tiny_patch4_32_fractals" in capsys.readouterr().out


def test_pretrain_finds_an_installed_recipe_by_name_and_suggests_on_a_typo(capsys, tmp_path):
    assert main(["pretrain", "dino_vit_tiny_patch4_32_fractal", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean dino_vit_tiny_patch4_32_fractals" in err and "zoo recipes" in err
    assert main(["pretrain", "mae_vit_tiny_patch4_32_fractals", "--run-dir", str(tmp_path / "m"),
                 "--set", "method.mask_ratio=1.5"]) == 2  # found by name, then validated
    assert "mask_ratio must be in (0, 1)" in capsys.readouterr().err
