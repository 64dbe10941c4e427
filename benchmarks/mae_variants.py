"""Every MAE variant vs plain MAE at the same steps, each on the evaluation that suits it.

    python benchmarks/mae_variants.py --steps 400            # the README table (about 40 minutes on 2 CPU cores)

Every run trains the CPU recipe of its method (`recipes/*_vit_tiny_patch4_32_*.yaml`: a ViT-Tiny/4 on 32 px) for the
same `--steps` at the same batch (64) and, from scratch, the same lr (`--lr`, warmup 40 steps, cosine); plain MAE is
the `mae` recipe on the SAME data as the variant it is compared with. Then, with frozen encoders:

- MP3 (position prediction, on fractals) vs MAE on fractals: digits kNN / linear, and MP3's own position accuracy
  on held-out fractals with full context (chance 1/64);
- medical MAE (grey, mask 0.9, crops 0.5-1, on digits) vs MAE on digits (RGB): digits kNN / linear;
- self-distillation further pretraining vs plain further pretraining (both continue MAE-fractals on digits at the
  official lr 1.5e-4, linear decay, no warmup) and vs the starting model: digits kNN / linear;
- SatMAE++ (multi-scale, 64-px targets, on scenes) vs MAE on scenes: scenes segmentation, linear-probe mIoU;
- BM-MAE (RGB + thermal + depth with modality dropout, on scenes) vs MAE on RGB scenes: segmentation mIoU from RGB
  only, thermal only and depth only (MAE sees thermal/depth as grey images on its 3 channels; BM-MAE through that
  modality's own patch embedding), and from all three together (BM-MAE only);
- LV-MAE (masked-embedding autoencoder over sequences of 9 crop embeddings of each digit, by the frozen MAE-fractals
  encoder) vs that encoder's own features of the whole image and the mean of its crop embeddings: digits kNN / linear.

The last column is a reference point: the untrained encoders (each method's own init, seeded like its run: MAE's
xavier init alone already gives a far better digits kNN than timm's), the starting model, chance, or the mean of the
crop embeddings. Prints one markdown table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

ARCH = "vit_tiny_patch4_32"
FROM_SCRATCH = ("mae_fractals", "mp3", "mae_digits", "medical", "mae_scenes", "satmae", "bmmae")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3.75e-4, help="from-scratch runs (MAE's blr 1.5e-3 at batch 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-seg", type=int, default=600, help="scenes for the segmentation probe's train split (val: half)")
    p.add_argument("--only", nargs="*", help="run only these runs (and what they need)")
    p.add_argument("--out", default="runs/mae_variants")
    p.add_argument("--reuse", action="store_true", help="skip runs an earlier call finished (same --out and seed)")
    args = p.parse_args()

    import zoo
    from zoo.data.builtin import materialize
    from zoo.eval.dense import dense_probe, extract_dense
    from zoo.eval.protocols import evaluate
    from zoo.hub import zoo_home

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = zoo_home() / "data"
    digits = (materialize("digits", "train", 1438, root=root), materialize("digits", "val", 359, root=root))
    seg = (materialize("scenes", "train", args.n_seg, root=root), materialize("scenes", "val", args.n_seg // 2, root=root))
    seconds: dict[str, float] = {}
    published: dict[str, str] = {}

    def train(key: str, recipe: str, *overrides: str, arch: str = ARCH) -> str:
        """Pretrain `recipe` for --steps; the name its main export was published under."""
        scratch = [f"optim.lr={args.lr}", "schedule.warmup_steps=40"] if key in FROM_SCRATCH else []
        name = f"{arch}.bench_{key}_s{args.seed}"
        done = out / key / "done.json"
        if args.reuse and done.exists() and json.loads(done.read_text()).get("steps") == args.steps:
            published[key] = name
            return name
        t0 = time.perf_counter()
        zoo.pretrain(recipe, run_dir=out / key, overwrite=True, seed=args.seed, publish=name,
                     overrides=[f"schedule.steps={args.steps}", "data.batch_size=64", "eval.final=[]", *scratch,
                                *overrides])
        seconds[key] = time.perf_counter() - t0
        published[key] = name
        print(json.dumps({"run": key, "seconds": round(seconds[key])}), flush=True)
        return name

    def on_digits(model: torch.nn.Module, what: str) -> dict[str, float]:
        r = evaluate(model.eval(), *digits, desc=what)
        return {"digits kNN": r["knn_top1"], "digits linear": r["linear_top1"]}

    def miou(model: torch.nn.Module, field: str = "image") -> float:
        model = model.eval()
        xtr, ytr = extract_dense(model, seg[0], image_field=field, batch_size=64)
        xva, yva = extract_dense(model, seg[1], image_field=field, batch_size=64)
        return dense_probe(xtr, ytr, xva, yva, head="linear", seed=0).metrics["mIoU"]

    def trained_method(key: str) -> torch.nn.Module:
        """The whole trained method of run `key` (heads included), from its last checkpoint, in eval mode."""
        from zoo.config import load_config
        from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint
        from zoo.engine.trainer import build_method

        method = build_method(load_config(out / key / "config.yaml"))
        method.load_state_dict(load_checkpoint(latest_checkpoint(out / key))["model"])
        return method.eval()

    def val_images(backbone: torch.nn.Module, name: str, n: int) -> torch.Tensor:
        """n held-out built-in images, as the backbone's eval transform gives them (B, C, H, W)."""
        from zoo.data import loader
        from zoo.data.transforms import SampleTransform, eval_transform

        urls = materialize(name, "val", n, root=root)
        batches = loader(urls, transform=SampleTransform(image=eval_transform(backbone.pretrained_cfg)),
                         batch_size=n, shuffle=0)
        return torch.cat([b["image"] for b in batches])[:n]

    rows: list[dict[str, Any]] = []

    def row(variant: str, data: str, metric: str, plain: float | None, value: float, reference: str = "") -> None:
        """One table row: the variant's value beside plain MAE's (same data, same steps) and a reference point."""
        rows.append({"variant": variant, "data": data, "evaluation": metric, "plain": plain, "value": value,
                     "reference": reference})
        print(json.dumps(rows[-1]), flush=True)

    def inits(plain: float, variant: float) -> str:
        return f"untrained: {plain:.1f} / {variant:.1f}"

    def untrained(recipe: str, *overrides: str) -> torch.nn.Module:
        """The recipe's method as built before step 0 (its own init, seeded like the run): the reference that
        shows what pretraining added (MAE's xavier init alone already gives digits kNN well above timm's)."""
        from zoo.config import load_config
        from zoo.engine.trainer import build_method

        torch.manual_seed(args.seed)
        return build_method(load_config(recipe, list(overrides))).eval()

    wanted: Callable[[str], bool] = lambda k: not args.only or k in args.only  # noqa: E731
    results = {"rows": rows, "seconds": seconds, "steps": args.steps, "seed": args.seed}
    # -- plain MAE on fractals: the baseline of MP3, the start of further pretraining, LV-MAE's embedder ----------
    mae_fractals = train("mae_fractals", "mae_vit_tiny_patch4_32_fractals")
    start = on_digits(zoo.load(mae_fractals), "MAE fractals")
    plain_init = untrained("mae_vit_tiny_patch4_32_fractals").backbone()  # MAE's init: the same whatever the data
    plain_init_digits = on_digits(plain_init, "MAE untrained")

    # -- MP3 (position prediction) vs MAE, both on fractals -----------------------------------------------------
    if wanted("mp3"):
        from zoo.recipes.mp3 import position_accuracy

        mp3 = train("mp3", "mp3_vit_tiny_patch4_32_fractals")
        a, b = start, on_digits(zoo.load(mp3), "MP3")
        init = on_digits(untrained("mp3_vit_tiny_patch4_32_fractals").backbone(), "MP3 untrained")
        for metric in a:
            row("MP3", "fractals", metric, a[metric], b[metric], inits(plain_init_digits[metric], init[metric]))
        method = trained_method("mp3")
        images = val_images(method.backbone(), "fractals", 512)
        for ratio, label in ((0.0, "full context"), (method.mask_ratio, f"{1 - method.mask_ratio:.0%} context")):
            acc = 100 * position_accuracy(method, images, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
            row("MP3", "fractals", f"position top-1 %, fractals val, {label}", None, acc, f"chance: {100 / 64:.1f}")

    # -- self-distillation further pretraining vs plain further pretraining, both from MAE-fractals on digits ----
    if wanted("distill"):
        further = [f"init_from={mae_fractals}"]
        plain = train("mae_continued", "mae_vit_tiny_patch4_32_fractals", *further, "data.builtin=digits",
                      "data.builtin_n=1438", "optim.lr=1.5e-4", "optim.weight_decay=0.01", "schedule.warmup_steps=0",
                      "schedule.kind=linear")
        distilled = train("distill", "mae_distill_vit_tiny_patch4_32_digits", *further)
        a, b = on_digits(zoo.load(plain), "MAE continued"), on_digits(zoo.load(distilled), "self-distillation")
        for metric in a:
            row("self-distillation (plain: MAE continued)", "MAE-fractals, then digits", metric, a[metric], b[metric],
                f"the start (MAE-fractals): {start[metric]:.1f}")
    # -- medical MAE (grey, mask 0.9, crops 0.5-1) vs MAE, both on digits ----------------------------------------
    if wanted("medical"):
        digits_data = ["data.builtin=digits", "data.builtin_n=1438"]
        plain = train("mae_digits", "mae_vit_tiny_patch4_32_fractals", *digits_data)
        medical = train("medical", "medical_mae_vit_tiny_patch4_32_digits", *digits_data)
        a, b = on_digits(zoo.load(plain), "MAE digits"), on_digits(zoo.load(medical), "medical MAE")
        init = on_digits(untrained("medical_mae_vit_tiny_patch4_32_digits").backbone(), "medical MAE untrained")
        for metric in a:
            row("medical MAE", "digits", metric, a[metric], b[metric], inits(plain_init_digits[metric], init[metric]))

    # -- SatMAE++ and BM-MAE vs MAE, all on scenes: segmentation from frozen patch maps ---------------------------
    if wanted("satmae") or wanted("bmmae"):
        plain = zoo.load(train("mae_scenes", "mae_vit_tiny_patch4_32_fractals", "data.builtin=scenes"))
        plain_rgb = miou(plain)
        plain_init_miou = {field: miou(plain_init, field) for field in ("image", "thermal", "depth")}
    if wanted("satmae"):
        satmae = train("satmae", "satmae_vit_tiny_patch4_32_scenes")
        init = miou(untrained("satmae_vit_tiny_patch4_32_scenes").backbone())
        row("SatMAE++ (64-px targets)", "scenes", "scenes mIoU, linear probe", plain_rgb, miou(zoo.load(satmae)),
            inits(plain_init_miou["image"], init))
    if wanted("bmmae"):
        bmmae = train("bmmae", "bmmae_vit_tiny_patch4_32_scenes")
        init = untrained("bmmae_vit_tiny_patch4_32_scenes").export(f"{ARCH}.init")
        for field in ("image", "thermal", "depth"):
            model = zoo.load(bmmae if field == "image" else f"{bmmae}_{field}")
            mae_value = plain_rgb if field == "image" else miou(plain, field)  # MAE: the grey rendering on 3 channels
            init_model = init[f"{ARCH}.init" if field == "image" else f"{ARCH}.init_{field}"].model
            row("BM-MAE (plain: MAE on RGB)", "scenes, 3 modalities", f"scenes mIoU from {field} only", mae_value,
                miou(model, field), inits(plain_init_miou[field], miou(init_model, field)))

    # -- LV-MAE over crop-embedding sequences vs the embedder alone ---------------------------------------------
    if wanted("lvmae"):
        from zoo.eval.knn import knn_eval
        from zoo.eval.linear import linear_probe
        from zoo.recipes.lvmae import builtin_sequences, sequence_features

        embedder = [f"method.embedder={mae_fractals}"]
        t0 = time.perf_counter()
        sequences = [builtin_sequences(split, n=n, embedder=mae_fractals) for split, n in (("train", 1438), ("val", 359))]
        seconds["lvmae embedding (once)"] = time.perf_counter() - t0
        lvmae = zoo.load(train("lvmae", "lvmae_seq_tiny_digits", *embedder, arch="seq_tiny"))

        def sequence_scores(model: torch.nn.Module | None) -> dict[str, float]:
            (xtr, ytr), (xva, yva) = (sequence_features(model, s) for s in sequences)
            return {"digits kNN": knn_eval(xtr, ytr, xva, yva, ks=(20,))["top1_k20"],
                    "digits linear": linear_probe(xtr, ytr, xva, yva).top1}

        mean, seq = sequence_scores(None), sequence_scores(lvmae)
        init = sequence_scores(untrained("lvmae_seq_tiny_digits", *embedder).backbone())
        for metric in mean:
            row("LV-MAE (plain: the embedder on the whole image)", "digits as 9-crop sequences", metric, start[metric],
                seq[metric], f"untrained: {init[metric]:.1f}; mean of the 9 crop embeddings: {mean[metric]:.1f}")

    print(f"\n{args.steps} steps each, batch 64, seed {args.seed}; val %, frozen encoders\n")
    print("| variant | pretrained on | evaluation | plain MAE | variant | variant − plain | reference "
          "(untrained: plain / variant) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        plain = "—" if r["plain"] is None else f"{r['plain']:.1f}"
        delta = "—" if r["plain"] is None else f"{r['value'] - r['plain']:+.1f}"
        print(f"| {r['variant']} | {r['data']} | {r['evaluation']} | {plain} | {r['value']:.1f} | {delta} | "
              f"{r['reference']} |")
    print("\npretraining wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
