"""DINO + iBOT on built-in fractals (no real image seen in pretraining) against random init, on real
handwritten digits: kNN (k=20) and linear-probe top-1 of the published teacher backbone.

    python benchmarks/dino_fractals.py --seeds 0 1            # the CPU recipe as shipped, 2 seeds

Each seed runs `zoo pretrain dino_vit_tiny_patch4_32_fractals` (its built-in data, its own final eval
into the card), then evaluates the same architecture at random init (the same seed) with the same
protocol. Prints a markdown table, writes results.json and dino_fractals.png to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RECIPE = "dino_vit_tiny_patch4_32_fractals"
METRICS = ("knn_top1", "linear_top1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, help="override the recipe's schedule.steps")
    p.add_argument("--out", default="runs/dino_fractals")
    args = p.parse_args()

    import zoo
    from zoo.data.builtin import materialize
    from zoo.engine.plots import bars
    from zoo.eval.protocols import evaluate
    from zoo.hub import zoo_home

    out = Path(args.out)
    rows: dict[str, dict[int, dict[str, float]]] = {"random init": {}, "DINO (fractals)": {}}
    seconds = {}
    for seed in args.seeds:
        name = f"vit_tiny_patch4_32.dino_fractal_s{seed}"
        t0 = time.perf_counter()
        res = zoo.pretrain(RECIPE, run_dir=out / f"seed{seed}", overwrite=True, seed=seed, publish=name,
                           **({"steps": args.steps} if args.steps else {}))
        seconds[seed] = time.perf_counter() - t0
        rows["DINO (fractals)"][seed] = dict(res.evals["digits"])
        cfg = zoo.load(name).pretrained_cfg
        size = cfg["input_size"][-1]
        train = materialize("digits", "train", 2000, root=zoo_home() / "data", size=size)
        val = materialize("digits", "val", 2000, root=zoo_home() / "data", size=size)
        torch.manual_seed(seed)
        random_init = zoo.create_model("vit_tiny_patch4_32").eval()
        rows["random init"][seed] = evaluate(random_init, train, val, desc="random init")
        print(json.dumps({"seed": seed, "seconds": round(seconds[seed]), **{k: v[seed] for k, v in rows.items()}}),
              flush=True)

    def cell(runs: dict[int, dict[str, float]], m: str) -> str:
        vals = [r[m] for r in runs.values()]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    print(f"\n| digits (val, %) | random init | DINO (fractals) | DINO − random (per seed) |\n|---|---|---|---|")
    for m in METRICS:
        gains = ", ".join(f"{rows['DINO (fractals)'][s][m] - rows['random init'][s][m]:+.1f}" for s in args.seeds)
        print(f"| {m} | {cell(rows['random init'], m)} | {cell(rows['DINO (fractals)'], m)} | {gains} |")
    print(f"\npretraining wall time per seed (s): {', '.join(f'{v:.0f}' for v in seconds.values())}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")
    means = {k: [statistics.mean(r[m] for r in v.values()) for m in METRICS] for k, v in rows.items()}
    errs = {k: [statistics.stdev([r[m] for r in v.values()]) if len(v) > 1 else 0.0 for m in METRICS]
            for k, v in rows.items()}
    bars(list(METRICS), means, out / "dino_fractals.png", errors=errs,
         title=f"digits top-1 (%), DINO on fractals vs random init, {len(args.seeds)} seed(s)")


if __name__ == "__main__":
    main()
