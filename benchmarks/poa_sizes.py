"""POA's claim in miniature: sub-networks cut from ONE POA run against the same sizes trained alone.

For each seed: one POA run (the CPU recipe as shipped: an intact ViT 128 x 6 at 32 px on built-in
fractals, elastic widths {64, 96, 128} x depths {3..6}) publishes the intact model and its (64, 3) and
(96, 6) sub-networks. Each of those three sizes is also pretrained alone with DINO (+ iBOT, KoLeo) for
the same steps, on the same data, crops, heads (one of 4096 prototypes, Sinkhorn-Knopp), optimizer and
schedules. Two references: the full-size DINO model sliced at the smaller sizes with the same
extraction (what POA's training is for: such slices should be near chance), and random init.
Every model gets kNN (k=20, T=0.07) and the linear probe (class token / + mean patch / 4 spaced blocks)
on digits val and fractals val.

    python benchmarks/poa_sizes.py --seeds 0 1        # the table in the README; about an hour on 2 cores

Prints a markdown table (mean ± std over seeds) and writes results.json and poa_sizes.png (accuracy vs
parameters, POA's figure) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RECIPE = "poa_vit_nano_patch4_32_fractals"
ARCH = "vit_nano_patch4_32"
TASKS = ("digits", "fractals")
METRICS = ("knn_top1", "linear_top1")
POA_ONLY = ("widths", "depths", "net_select_scale", "elastic_per_step", "intact_weight", "out_dims",
            "ibot_start_epoch", "export_sizes", "pool_seed", "momentum_teacher_end")


def twin_recipe(width: int, depth: int, head_dim: int) -> dict:
    """The POA CPU recipe as a DINO run of one size: POA's own keys dropped, one head of POA's largest
    prototype count, the same Sinkhorn-Knopp targets, crops, optimizer and schedules (the teacher momentum
    ends at DINO's 1, not POA's 0.9999: the README's table was made so)."""
    from zoo.config import installed_recipes
    import yaml

    cfg = yaml.safe_load(Path(installed_recipes()[RECIPE]).read_text())
    method = {k: v for k, v in cfg["method"].items() if k not in POA_ONLY}
    method.update(name="dino", out_dim=max(cfg["method"]["out_dims"]), centering="sinkhorn_knopp")
    cfg["method"] = method
    cfg["model"] = {**cfg["model"], "embed_dim": width, "depth": depth, "num_heads": width // head_dim}
    cfg["eval"] = {**cfg["eval"], "final": []}
    return cfg


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, help="override the recipe's schedule.steps (all runs alike)")
    p.add_argument("--n-eval", type=int, default=2000, help="train and val samples per eval task")
    p.add_argument("--out", default="runs/poa_sizes")
    args = p.parse_args()

    import zoo
    from zoo.data.builtin import materialize
    from zoo.engine.plots import save, _new_figure
    from zoo.eval.protocols import evaluate
    from zoo.hub import zoo_home
    from zoo.models.elastic import extract

    out = Path(args.out)
    steps = {"steps": args.steps} if args.steps else {}
    data = {t: (materialize(t, "train", args.n_eval, root=zoo_home() / "data"),
                materialize(t, "val", args.n_eval, root=zoo_home() / "data")) for t in TASKS}

    def scores(model: torch.nn.Module, what: str) -> dict[str, float]:
        row = {}
        for t, (train, val) in data.items():
            res = evaluate(model.eval(), train, val, linear_variants=("cls", "cls+avg", "spaced4"), desc=f"{what} {t}")
            row.update({f"{t}_{m}": res[m] for m in METRICS})
        return row

    rows: dict[str, dict[str, dict[int, dict[str, float]]]] = {}  # size -> column -> seed -> metrics
    sizes: dict[str, int] = {}
    seconds: dict[str, list[float]] = {}
    for seed in args.seeds:
        name = f"{ARCH}.poa_sizes_s{seed}"
        t0 = time.perf_counter()
        res = zoo.pretrain(RECIPE, run_dir=out / f"poa_s{seed}", overwrite=True, seed=seed, publish=name, **steps)
        seconds.setdefault("POA (one run, all sizes)", []).append(time.perf_counter() - t0)
        published = {n: zoo.load(n) for n in res.published}
        poa = {(m.embed_dim, len(m.blocks)): m for m in published.values()}
        head_dim = next(iter(poa.values())).blocks[0].attn.head_dim
        full = max(poa)
        for (w, d), model in sorted(poa.items()):
            size = f"w{w} d{d}"
            sizes[size] = params(model)
            rows.setdefault(size, {}).setdefault("POA (extracted)", {})[seed] = scores(model, f"POA {size}")
            t0 = time.perf_counter()
            twin = zoo.pretrain(twin_recipe(w, d, head_dim), run_dir=out / f"dino_{size.replace(' ', '_')}_s{seed}",
                                overwrite=True, seed=seed, publish=f"{ARCH}.poa_sizes_dino_w{w}_d{d}_s{seed}", **steps)
            seconds.setdefault(f"DINO alone {size}", []).append(time.perf_counter() - t0)
            alone = zoo.load(next(iter(twin.published)))
            rows[size].setdefault("DINO alone", {})[seed] = scores(alone, f"DINO {size}")
            torch.manual_seed(seed)
            random_init = extract(zoo.create_model(ARCH, depth=full[1]), w, d)
            rows[size].setdefault("random init", {})[seed] = scores(random_init, f"random {size}")
        dino_full = zoo.load(f"{ARCH}.poa_sizes_dino_w{full[0]}_d{full[1]}_s{seed}")
        for (w, d) in sorted(poa):
            if (w, d) != full:
                rows[f"w{w} d{d}"].setdefault("DINO full, sliced", {})[seed] = scores(extract(dino_full, w, d), f"sliced w{w} d{d}")
        print(json.dumps({"seed": seed, "rows": {s: {c: v[seed] for c, v in cols.items()} for s, cols in rows.items()}}),
              flush=True)

    def cell(runs: dict[int, dict[str, float]], key: str) -> str:
        vals = [r[key] for r in runs.values()]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    columns = ["POA (extracted)", "DINO alone", "DINO full, sliced", "random init"]
    keys = [f"{t}_{m}" for t in TASKS for m in METRICS]
    print(f"\n{len(args.seeds)} seed(s); top-1 %, mean ± std over seeds\n")
    print("| size (params) | model | " + " | ".join(k.replace("_top1", "").replace("_", " ") for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for size in sorted(rows, key=lambda s: sizes[s]):
        for col in columns:
            if col in rows[size]:
                print(f"| {size} ({sizes[size] / 1e6:.2f}M) | {col} | " + " | ".join(cell(rows[size][col], k) for k in keys) + " |")
    print("\nPOA − DINO alone (per seed): " + "; ".join(
        f"{size}: " + ", ".join(f"{k.split('_')[0]} {k.split('_')[1]} " + "/".join(
            f"{rows[size]['POA (extracted)'][s][k] - rows[size]['DINO alone'][s][k]:+.1f}" for s in args.seeds) for k in keys)
        for size in sorted(rows, key=lambda s: sizes[s])))
    print("\npretraining wall time (s): " + "; ".join(f"{k}: {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in seconds.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "params": sizes, "seconds": seconds}, indent=2) + "\n")

    fig = _new_figure((1100, 420))
    for i, t in enumerate(TASKS):
        ax = fig.add_subplot(1, len(TASKS), i + 1)
        for col in columns:
            pts = sorted((sizes[s], statistics.mean(r[f"{t}_knn_top1"] for r in rows[s][col].values()))
                         for s in rows if col in rows[s])
            ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], marker="o", label=col)
        ax.set_title(f"{t} val: kNN top-1 vs parameters")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, out / "poa_sizes.png")


if __name__ == "__main__":
    main()
