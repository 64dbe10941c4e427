"""LOOK vs cross-entropy vs SupCon, pretrained on coarse labels, transferred to classes they never saw.

    python benchmarks/look_transfer.py --seeds 0 1

LOOK's claim (arXiv:2110.06014): cross-entropy pulls every image of a class to one point and loses the class's
inner structure; LOOK's leave-one-out kNN vote lets a class stay multi-modal, so it transfers better to tasks
whose classes are not the pretraining classes, at similar upstream accuracy. In miniature: each recipe's CPU
YAML (`{supervised,supcon,look}_vit_nano_patch4_32_digits_coarse`: the same ViT-N/4, optimiser, steps and
crops; SupCon's two views at half the images, so every method runs 128 crops a step) pretrains on the built-in
`digits_coarse` (5 super-classes of two unrelated digits each), then the frozen class token is evaluated by
kNN (k = 20) and the linear probe on:

- coarse: the 5 super-classes trained on (digits_coarse val): upstream accuracy;
- fine: the same images' 10 digits, each super-class split in two: the structure inside a class;
- scenes: the shape of the largest object in built-in scenes (6 classes): another domain;

plus the same architecture at random init, and LOOK with options changed (`--look k=200 ...`, one row each).
Prints a markdown table (mean ± std over seeds), writes
results.json and look_transfer.png to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

METHODS = {"cross-entropy": "supervised", "SupCon": "supcon", "LOOK": "look"}
TASKS = {"coarse": ("digits_coarse", "label"), "fine": ("digits_coarse", "fine"), "scenes": ("scenes", "label")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, help="override the recipes' schedule.steps")
    p.add_argument("--scenes", type=int, default=2000, help="scenes train images (val: a quarter)")
    p.add_argument("--methods", nargs="*", default=list(METHODS.values()), choices=list(METHODS.values()),
                   help="the recipes to run as shipped (default: all three)")
    p.add_argument("--look", nargs="*", default=["k=200", "momentum_encoder=0.99"],
                   help="extra LOOK rows, each one recipe value changed: a method option (k=200) or a dotted "
                        "key (schedule.steps=1200)")
    p.add_argument("--out", default="runs/look_transfer")
    args = p.parse_args()

    import zoo
    from zoo.data.builtin import materialize
    from zoo.engine.plots import bars
    from zoo.eval.protocols import evaluate
    from zoo.hub import zoo_home

    out = Path(args.out)
    root = zoo_home() / "data"
    data = {t: (materialize(name, "train", args.scenes if name == "scenes" else 1438, root=root),
                materialize(name, "val", args.scenes // 4 if name == "scenes" else 359, root=root))
            for t, (name, _) in TASKS.items()}
    runs = [(label, method, None) for label, method in METHODS.items() if method in args.methods]
    runs += [(f"LOOK ({option})", "look", option) for option in args.look]
    rows: dict[str, dict[int, dict[str, float]]] = {name: {} for name in ("random init", *(r[0] for r in runs))}
    upstream: dict[str, dict[int, float]] = {r[0]: {} for r in runs}
    seconds: dict[str, list[float]] = {r[0]: [] for r in runs}

    def transfer(model, what: str) -> dict[str, float]:
        res = {}
        for task, (_, field) in TASKS.items():
            r = evaluate(model, *data[task], label_field=field, desc=f"{what} {task}")
            res.update({f"{task}_knn": r["knn_top1"], f"{task}_linear": r["linear_top1"]})
        return res

    for seed in args.seeds:
        torch.manual_seed(seed)
        rows["random init"][seed] = transfer(zoo.create_model("vit_nano_patch4_32", num_classes=0).eval(), "random")
        for i, (label, method, option) in enumerate(runs):
            tag = f"{method}{i}" if option else method
            name = f"vit_nano_patch4_32.{tag}_digits_coarse_s{seed}"
            t0 = time.perf_counter()
            res = zoo.pretrain(f"{method}_vit_nano_patch4_32_digits_coarse", run_dir=out / f"{tag}_s{seed}",
                               overrides=[option if "." in option.split("=")[0] else f"method.{option}"] if option else [],
                               overwrite=True, seed=seed,
                               publish=name, eval__final=[], **({"steps": args.steps} if args.steps else {}))
            seconds[label].append(time.perf_counter() - t0)
            train_acc = [m["acc"] for m in res.metrics if "acc" in m][-5:]  # last 5 logged (LOOK: its kNN vote)
            upstream[label][seed] = statistics.mean(train_acc) if train_acc else float("nan")
            rows[label][seed] = transfer(zoo.load(name), label)
            print(json.dumps({"seed": seed, "method": label, "seconds": round(seconds[label][-1]),
                              "train_acc": upstream[label][seed], **rows[label][seed]}), flush=True)

    metrics = [f"{t}_{p}" for t in TASKS for p in ("knn", "linear")]

    def cell(runs: dict[int, dict[str, float]], m: str) -> str:
        vals = [r[m] for r in runs.values()]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    print(f"\n{len(args.seeds)} seed(s); top-1 % on val, frozen class token (kNN k=20 / linear probe)\n")
    print("| pretraining | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
    for label, runs in rows.items():
        print(f"| {label} | " + " | ".join(cell(runs, m) for m in metrics) + " |")
    print("\ntraining accuracy on coarse labels, last 5 logged steps (CE: classifier; LOOK: its kNN vote; SupCon: none): "
          + ", ".join(f"{k} {statistics.mean(v.values()):.1f}" for k, v in upstream.items() if v))
    print("pretraining wall time (s): " + ", ".join(f"{k} {statistics.mean(v):.0f}" for k, v in seconds.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "upstream_train_acc": upstream, "seconds": seconds},
                                                 indent=2) + "\n")
    means = {k: [statistics.mean(r[m] for r in v.values()) for m in metrics] for k, v in rows.items()}
    errs = {k: [statistics.stdev([r[m] for r in v.values()]) if len(v) > 1 else 0.0 for m in metrics]
            for k, v in rows.items()}
    bars(metrics, means, out / "look_transfer.png", errors=errs,
         title=f"top-1 (%) after pretraining on coarse digits, {len(args.seeds)} seed(s)")


if __name__ == "__main__":
    main()
