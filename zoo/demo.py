"""`zoo demo`: the main job on built-in data only, in a few minutes on a CPU.

Make shards (fractals to pretrain on; real digits and scenes to evaluate on), pretrain MAE on
fractals, publish the encoder, reload it by name, and compare it with the same architecture at
random weights by kNN and linear probe. Prints a table and writes results.json (+ the run).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

RECIPE = "mae_vit_tiny_patch4_32_fractals.yaml"
ARCH = "vit_tiny_patch4_32"
NAME = f"{ARCH}.mae_fractal_demo"


def _say(msg: str) -> None:
    print(f"[zoo demo] {msg}", flush=True)


def make_data(out: Path, n_pretrain: int, seed: int) -> dict[str, str]:
    """Built-in shards: fractals for pretraining, digits and scenes (train/val) for evaluation."""
    from zoo.data import write_shards
    from zoo.data.builtin import generate
    from zoo.registry import DATASETS

    plan = [("fractals", "train", n_pretrain), ("digits", "train", 1438), ("digits", "val", 359),
            ("scenes", "train", 1000), ("scenes", "val", 500)]
    paths = {}
    for name, split, n in plan:
        folder = out / "data" / f"{name}-{split}"
        if not (folder / "sizes.json").is_file():
            meta = DATASETS.get(name).meta
            write_shards(generate(name, n, seed=seed, split=split), folder, maxcount=1000, total=n, desc=f"{name}/{split}",
                         info={"name": name, "split": split, "classes": list(meta.get("classes", ())) or None})
        paths[f"{name}-{split}"] = str(folder / "*.tar")
    return paths


def evaluate(model: torch.nn.Module, data: dict[str, str], cache: Path) -> dict[str, float]:
    """kNN (k=20) and linear-probe top-1 on digits and scenes."""
    from zoo.eval.protocols import evaluate as run_protocols

    out = {}
    for task in ("digits", "scenes"):
        res = run_protocols(model, data[f"{task}-train"], data[f"{task}-val"], cache_dir=cache, desc=f"{task} features")
        out[f"{task} kNN top-1"], out[f"{task} linear top-1"] = res["knn_top1"], res["linear_top1"]
    return out


def run_demo(out: str | Path = "zoo-demo", *, steps: int = 320, n_pretrain: int = 5000, seed: int = 0) -> dict[str, Any]:
    """The whole demo; returns {"mae": {...}, "random": {...}, "pretrain": {...}}."""
    import zoo
    from zoo.engine.trainer import pretrain

    t0 = time.perf_counter()
    out = Path(out)
    _say(f"1/4 making built-in shards in {out}/data (fractals, digits, scenes)")
    data = make_data(out, n_pretrain, seed)
    _say(f"2/4 pretraining MAE on fractals: {ARCH}, {steps} steps")
    recipe = resources.files("zoo.recipes") / RECIPE
    res = pretrain(str(recipe), data=data["fractals-train"], run_dir=out / "run", overwrite=True,
                   overrides=[f"schedule.steps={steps}", f"output.publish={NAME}", f"seed={seed}",
                              "schedule.warmup_steps=40", "optim.blr=1.5e-3", "data.num_workers=1", "eval.final=[]"])
    first, last = res.metrics[0]["loss"], res.metrics[-1]["loss"]
    _say(f"3/4 reloading {NAME} by name and evaluating it against random weights")
    mae = zoo.load(NAME)
    torch.manual_seed(seed)
    random_init = zoo.create_model(ARCH, pos_embed="sincos").eval()
    cache = out / "features"
    results = {"mae": evaluate(mae, data, cache), "random": evaluate(random_init, data, cache),
               "pretrain": {"steps": res.steps, "first_loss": first, "last_loss": last,
                            "img_per_s": res.metrics[-1].get("img_per_s"), "run_dir": str(res.run_dir)},
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _say("4/4 results")
    rows = [(k, results["random"][k], results["mae"][k]) for k in results["mae"]]
    print(f"\n{'task (val, %)':24s} {'random init':>12s} {'MAE (fractals)':>15s} {'gain':>7s}")
    for k, r, m in rows:
        print(f"{k:24s} {r:12.1f} {m:15.1f} {m - r:+7.1f}")
    print(f"\npretraining: {res.steps} steps, loss {first:.3f} -> {last:.3f}; "
          f"total {results['seconds']:.0f} s; results in {out / 'results.json'}; model: zoo.load({NAME!r})")
    return results
