"""UNIP's claim in miniature: a small student distilled from a larger teacher's HYBRID attention layer segments
thermal images better than the same student pretrained with MAE, and better than one distilled from the most
local or the most global layer.

Teacher: an MAE ViT-S/4 (8 blocks, 6 heads) pretrained on built-in RGB scenes (recipe
mae_vit_small_patch4_32_scenes; trained here unless --teacher names a published one). `zoo analyze attention`'s
measurements on thermal scenes pick three of its layers: the hybrid one (the band rule), the most local
(highest NMI) and the most global (lowest NMI). Students, ViT-T/4 (6 blocks, the last with the teacher's 6
heads), each pretrained for the same steps on the same InfMix-style data (thermal scenes + grey fractals, half
and half): UNIP from each of the three layers, and MAE; plus random init. Each student is scored on
segmentation of held-out thermal-like scenes (7 classes: background + 6 shapes) with a frozen backbone: the
linear probe (final-norm patch maps, 1x1 conv) and the LL-FPN head (raw last-block maps, UNIP's head).

    python benchmarks/unip_thermal.py --seeds 0 1       # the README table; about an hour on 2 cores

Prints a markdown table (mean ± std over seeds, per-seed values) and writes results.json and the teacher's
NMI plot (attention.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

TEACHER_RECIPE = "mae_vit_small_patch4_32_scenes"
UNIP_RECIPE = "unip_vit_tiny_patch4_32_scenes"
STUDENT = "vit_tiny_patch4_32"
HEADS = ("linear", "llfpn")


def register_mae_infmix() -> None:
    """MAE on UNIP's InfMix data (the grey images UNIP students see), for the MAE-student baseline."""
    from zoo.recipes.base import DataSpec
    from zoo.recipes.mae import MAE
    from zoo.recipes.unip import InfMix
    from zoo.registry import RECIPES

    class MAEInfMix(MAE):
        def data_spec(self) -> DataSpec:
            mix = InfMix(self.encoder.pretrained_cfg, scale=(0.2, 1.0), hflip=0.5, interpolation="bicubic")
            return DataSpec(fields=("image",), optional_fields=("thermal",), transform=mix)

    if "mae_infmix" not in [e.name for e in RECIPES]:
        RECIPES.register("mae_infmix", MAEInfMix, family="mae", description="MAE on InfMix grey images (benchmark)")


def student_recipe(kind: str, layer: int | None, teacher: str, steps: int | None) -> dict:
    """The UNIP CPU recipe distilling from `layer` (1-based), or the same data, optimizer, schedule and student
    size as an MAE run (`kind="mae"`)."""
    import yaml

    from zoo.config import installed_recipes
    from zoo.recipes.unip import INFRARED_MEAN, INFRARED_STD

    cfg = yaml.safe_load(Path(installed_recipes()[UNIP_RECIPE]).read_text())
    if kind == "unip":
        cfg["method"].update(teacher=teacher, teacher_layer=layer)
    else:
        cfg["method"] = {"name": "mae_infmix", "mask_ratio": 0.75, "norm_pix_loss": True, "decoder_dim": 128,
                         "decoder_depth": 2, "decoder_heads": 4}
        cfg["model"] = {**cfg["model"], "mean": list(INFRARED_MEAN), "std": list(INFRARED_STD)}
    cfg["eval"] = {**cfg.get("eval", {}), "final": []}
    if steps:
        cfg["schedule"]["steps"] = steps
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--teacher", help="a published teacher ViT (default: train recipe mae_vit_small_patch4_32_scenes)")
    p.add_argument("--steps", type=int, help="student pretraining steps (default: the UNIP CPU recipe's)")
    p.add_argument("--n-seg", type=int, default=600, help="thermal scenes for the segmentation train split (val: half)")
    p.add_argument("--analysis-images", type=int, default=256)
    p.add_argument("--out", default="runs/unip_thermal")
    p.add_argument("--reuse", action="store_true", help="skip students already published by an earlier run")
    args = p.parse_args()

    import zoo
    from zoo.data.builtin import materialize
    from zoo.eval.dense import dense_probe, extract_dense
    from zoo.hub import zoo_home
    from zoo.recipes.unip import UNIP
    from zoo.tools.attention_analysis import analyze_attention

    register_mae_infmix()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {}
    teacher_name = args.teacher
    if teacher_name is None:
        t0 = time.perf_counter()
        res = zoo.pretrain(TEACHER_RECIPE, run_dir=out / "teacher", overwrite=True)
        seconds["teacher (MAE ViT-S)"] = [time.perf_counter() - t0]
        teacher_name = next(iter(res.published))
    teacher = zoo.load(teacher_name)

    root = zoo_home() / "data"
    seg_train = materialize("scenes", "train", args.n_seg, root=root)
    seg_val = materialize("scenes", "val", args.n_seg // 2, root=root)
    report = analyze_attention(teacher, seg_train, n_images=args.analysis_images, image_field="thermal",
                               model_name=teacher_name, plot=out / "attention.png")
    (out / "attention.json").write_text(json.dumps(report, indent=2) + "\n")
    layers = {row["layer"]: row["nmi"] for row in report["layers"]}
    chosen = {"hybrid": report["hybrid_layer"]["layer"], "local": max(layers, key=layers.get),
              "global": min(layers, key=layers.get)}
    print("teacher NMI per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in layers.items()))
    print(f"distilled layers (1-based): {chosen}", flush=True)

    def scores(model: torch.nn.Module, what: str) -> dict[str, float]:
        model = model.eval()
        row = {}
        for head in HEADS:
            norm = head == "linear"
            kw = dict(norm=norm, image_field="thermal", batch_size=64)
            xtr, ytr = extract_dense(model, seg_train, **kw)
            xva, yva = extract_dense(model, seg_val, **kw)
            # LL-FPN: one lr (the middle of its grid), 5 epochs: its transposed convolutions at the ViT's width
            # cost about 0.3 GFLOP per image and step on the CPU, 20 minutes per model with the default grid
            grid = {"lrs": (1e-3,), "epochs": 5} if head == "llfpn" else {}
            res = dense_probe(xtr, ytr, xva, yva, head=head, seed=0, **grid)
            row[f"{head}_mIoU"] = res.metrics["mIoU"]
            print(f"  {what}: {head} mIoU {res.metrics['mIoU']:.1f}", flush=True)
        return row

    columns = [f"UNIP, hybrid layer {chosen['hybrid']}", f"UNIP, most local layer {chosen['local']}",
               f"UNIP, most global layer {chosen['global']}", "MAE student", "random init"]
    rows: dict[str, dict[int, dict[str, float]]] = {c: {} for c in columns}
    for seed in args.seeds:
        for col, kind, layer in ((columns[0], "unip", chosen["hybrid"]), (columns[1], "unip", chosen["local"]),
                                 (columns[2], "unip", chosen["global"]), (columns[3], "mae", None)):
            if kind == "unip" and col != columns[0] and layer == chosen["hybrid"]:
                rows[col][seed] = rows[columns[0]][seed]  # the same layer: the same run
                continue
            tag = f"unip_thermal_{kind}{layer or ''}_s{seed}"
            metrics = out / tag / "metrics.jsonl"
            if not (args.reuse and metrics.exists() and (zoo_home() / "models" / f"{STUDENT}.{tag}").is_dir()):
                t0 = time.perf_counter()
                zoo.pretrain(student_recipe(kind, layer, teacher_name, args.steps), run_dir=out / tag,
                             overwrite=True, seed=seed, publish=f"{STUDENT}.{tag}")
                seconds.setdefault(col, []).append(time.perf_counter() - t0)
            rows[col][seed] = scores(zoo.load(f"{STUDENT}.{tag}"), f"{col} s{seed}")
            rows[col][seed]["final_loss"] = json.loads(metrics.read_text().splitlines()[-1])["loss"]
        torch.manual_seed(seed)
        random_init = UNIP(STUDENT, teacher=teacher_name, teacher_layer=chosen["hybrid"]).student
        rows[columns[4]][seed] = scores(random_init, f"random s{seed}")
        print(json.dumps({"seed": seed, "rows": {c: r.get(seed) for c, r in rows.items()}}), flush=True)

    def cell(runs: dict[int, dict[str, float]], key: str) -> str:
        vals = [r[key] for r in runs.values()]
        per_seed = "/".join(f"{v:.1f}" for v in vals)
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f} ({per_seed})" if len(vals) > 1 else f"{vals[0]:.1f}"

    print(f"\n{len(args.seeds)} seed(s); thermal-scenes segmentation mIoU %, frozen backbone, mean ± std (per seed)\n")
    print("| student (ViT-T/4) | linear probe | LL-FPN |")
    print("|---|---|---|")
    for col in columns:
        print(f"| {col} | " + " | ".join(cell(rows[col], f"{h}_mIoU") for h in HEADS) + " |")
    print("\nteacher " + teacher_name + ": " + ", ".join(f"L{k} NMI {v:.3f}" for k, v in layers.items())
          + f"; hybrid band {report['band_edges']['hybrid']}")
    print("pretraining wall time (s): " + "; ".join(f"{k}: {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in seconds.items()))
    (out / "results.json").write_text(json.dumps({"rows": rows, "layers": chosen, "nmi": layers, "seconds": seconds,
                                                  "teacher": teacher_name}, indent=2) + "\n")


if __name__ == "__main__":
    main()
