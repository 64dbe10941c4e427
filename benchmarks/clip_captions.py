"""Experiment: do better-aligned captions give better visual features? ("CLIP with Quality Captions")

Same architecture (the CPU-scale `clip_nano_patch4_32`), steps, data and seed; only the caption policy
differs: `alt` trains on the built-in scenes' noisy, alt-text-like captions, `quality` on their exact
and short captions. Each trained model is published, reloaded by name, and evaluated on held-out
scenes: zero-shot classification (the scene's label: which shape is largest), image<->text retrieval
R@1 on the exact captions, a linear probe on the image tower's features, and a dense probe (mIoU on
the scenes' segmentation masks). Repeated over seeds; prints a table and writes a bar chart.

    python benchmarks/clip_captions.py --seeds 0 1 --steps 400        # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

POLICIES = {"alt": "alt (noisy captions)", "quality": "quality (exact/short)"}
METRICS = ("zero-shot top-1", "retrieval R@1 (i2t)", "retrieval R@1 (t2i)", "linear top-1", "dense mIoU")


def make_data(out: Path, n_train: int, seed: int) -> dict[str, str]:
    """Scenes shards: a pretraining set and separate probe train / val sets."""
    from zoo.data import write_shards
    from zoo.data.builtin import generate
    from zoo.registry import DATASETS

    classes = list(DATASETS.get("scenes").meta.get("classes", ()))
    paths = {}
    for name, split, n in (("pretrain", "train", n_train), ("probe-train", "train", 1000), ("probe-val", "val", 500)):
        folder = out / "data" / name
        if not (folder / "sizes.json").is_file():
            write_shards(generate("scenes", n, seed=seed + (7 if name == "probe-train" else 0), split=split), folder,
                         maxcount=1000, total=n, desc=f"scenes/{name}",
                         info={"name": "scenes", "split": split, "classes": classes or None})
        paths[name] = str(folder / "*.tar")
    paths["classes"] = classes
    return paths


def evaluate(tower: torch.nn.Module, whole: torch.nn.Module, data: dict, classes: list[str]) -> dict[str, float]:
    from zoo.eval.dense import dense_probe, extract_dense
    from zoo.eval.features import extract_features
    from zoo.eval.linear import linear_probe
    from zoo.eval.retrieval import retrieval_eval
    from zoo.eval.zeroshot import zero_shot_eval

    tok = whole.tokenizer
    zs = zero_shot_eval(whole, tok, data["probe-val"], classes, templates=("a scene where the largest object is a {}.",))
    ret = retrieval_eval(whole, tok, data["probe-val"], caption=("caption",))
    kw = dict(variants=("cls", "avg"), batch_size=256)
    xtr, ytr = extract_features(tower, data["probe-train"], desc="probe train features", **kw)
    xva, yva = extract_features(tower, data["probe-val"], desc="probe val features", **kw)
    lin = linear_probe(xtr, ytr, xva, yva, epochs=30)
    dtr, mtr = extract_dense(tower, data["probe-train"], max_samples=500)
    dva, mva = extract_dense(tower, data["probe-val"])
    dense = dense_probe(dtr, mtr, dva, mva, epochs=20)
    return {"zero-shot top-1": zs["top1"], "retrieval R@1 (i2t)": ret["image_to_text_R@1"],
            "retrieval R@1 (t2i)": ret["text_to_image_R@1"], "linear top-1": lin.top1, "dense mIoU": dense.metrics["mIoU"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="clip-captions")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n", type=int, default=4000, help="pretraining scenes")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()

    import zoo
    from zoo.engine.plots import bars
    from zoo.engine.trainer import pretrain

    out = Path(args.out)
    t0 = time.perf_counter()
    data = make_data(out, args.n, seed=0)
    classes = data["classes"]
    recipe = str(resources.files("zoo.recipes") / "clip_nano_patch4_32_scenes.yaml")
    results: dict[str, dict[int, dict[str, float]]] = {p: {} for p in POLICIES}
    for seed in args.seeds:
        for policy in POLICIES:
            name = f"clip_vit_nano_patch4_32.scenes_{policy}_s{seed}"
            print(f"== {policy}, seed {seed}: {args.steps} steps", flush=True)
            res = pretrain(recipe, data=data["pretrain"], run_dir=out / "runs" / f"{policy}_s{seed}", overwrite=True,
                           overrides=[f"method.captions={policy}", f"seed={seed}", f"schedule.steps={args.steps}",
                                      f"data.batch_size={args.batch}", f"output.publish={name}", "data.num_workers=1",
                                      "output.checkpoint_every=0"])
            tower, whole = zoo.load(name), zoo.load(name.replace("clip_vit_nano", "clip_nano", 1))
            results[policy][seed] = {**evaluate(tower, whole, data, classes),
                                     "final loss": res.metrics[-1]["loss"]}
            print(json.dumps(results[policy][seed]), flush=True)

    mean = {p: {m: statistics.mean(r[s][m] for s in r) for m in METRICS} for p, r in results.items()}
    spread = {p: {m: statistics.pstdev([r[s][m] for s in r]) for m in METRICS} for p, r in results.items()}
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x batch {args.batch} on {args.n} scenes; "
          f"mean ± std over seeds (%), chance: zero-shot/linear {100 / len(classes):.1f}")
    print("| metric | " + " | ".join(POLICIES.values()) + " | quality − alt |")
    print("|---|" + "---|" * (len(POLICIES) + 1))
    for m in METRICS:
        cells = [f"{mean[p][m]:.1f} ± {spread[p][m]:.1f}" for p in POLICIES]
        print(f"| {m} | " + " | ".join(cells) + f" | {mean['quality'][m] - mean['alt'][m]:+.1f} |")
    per_seed = {m: [results["quality"][s][m] - results["alt"][s][m] for s in args.seeds] for m in METRICS}
    print("\nquality − alt per seed: " + "; ".join(f"{m}: {', '.join(f'{d:+.1f}' for d in v)}" for m, v in per_seed.items()))
    chart = bars(list(METRICS), {POLICIES[p]: [mean[p][m] for m in METRICS] for p in POLICIES},
                 out / "clip_captions.png", errors={POLICIES[p]: [spread[p][m] for m in METRICS] for p in POLICIES},
                 title=f"CLIP on scenes: alt vs quality captions ({len(args.seeds)} seeds, {args.steps} steps)")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"chart: {chart}; results: {out / 'results.json'}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
