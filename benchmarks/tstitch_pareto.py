"""T-Stitch's claim in miniature: the first fraction r of the sampling steps can run a small DiT instead of the
large one with no loss of sample quality up to r ≈ 0.4, and the wall-clock cost falls with r as the FLOPs say.

Models: the CPU pair, trained on the built-in digits (8 px, grey, 10 classes) by their recipes unless published
already: dit_nano_patch2_8.digits (small, 0.4M parameters, 6.7 MFLOPs a forward) and dit_tiny_patch2_8.digits
(large, 4.6M, 89 MFLOPs: 13x, the paper's DiT-S vs DiT-XL is 23x). For r in 0, 0.1, ..., 1 and each scheduler
(DDIM 50 steps, η = 0, the paper's FID sampler; DPM-Solver++ 20 steps), the same seeds and labels (n per run, the
classes in turn), classifier-free guidance 1.5 (the paper's FID setting):

- Fréchet distance to the real train digits in the feature space of a zoo backbone (--backbone; default the
  MAE ViT-T/4 that `zoo demo` pretrains on fractals: it never saw a digit), lower is better;
- label accuracy: a linear probe on that backbone's features, trained on the real train digits, applied to the
  samples with their conditioning labels (its accuracy on the real val digits is the ceiling);
- wall time of the sampling loop (2 threads), FLOPs per sample (torch's counter, 2 per multiply-add), the
  measured speedup over r = 0 against the FLOP-predicted one.

    python benchmarks/tstitch_pareto.py                 # the README table (about 30 min on 2 cores)
    python benchmarks/tstitch_pareto.py --paper         # timing only: DiT-S/2 -> DiT-XL/2 at 256 px, GPU, bf16

Prints markdown tables; writes results.json, pareto.png (quality vs time) and samples_<scheduler>.png (a row
of samples per r) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

SMALL, LARGE = "dit_nano_patch2_8.digits", "dit_tiny_patch2_8.digits"
RECIPES = {SMALL: "diffusion_dit_nano_patch2_8_digits", LARGE: "diffusion_dit_tiny_patch2_8_digits"}
SCHEDULERS = {"ddim": 50, "dpm++": 20}


def ensure_published(name: str) -> None:
    import zoo
    from zoo.hub import store_names

    if name not in store_names():
        print(f"training {name} (recipe {RECIPES[name]}) ...", flush=True)
        zoo.pretrain(RECIPES[name], run_dir=f"runs/tstitch/{name}", overwrite=True)


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits at 8 px as grey [0, 1] tensors (what the DiTs model) and their labels."""
    from zoo.data.builtin import DATASETS, generate

    n = DATASETS.get("digits").meta["max_samples"][split]
    samples = list(generate("digits", n, size=8, split=split))
    images = np.stack([np.asarray(s["image"].convert("L"), dtype=np.float32) / 255 for s in samples])
    return torch.from_numpy(images)[:, None], torch.tensor([s["label"] for s in samples])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_tiny_patch4_32.mae_fractal_demo",
                   help="zoo backbone whose features FD and the label probe use (default: `zoo demo`'s)")
    p.add_argument("--n", type=int, default=500, help="samples per run (default 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fractions", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(11)])
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--out", default="runs/tstitch_pareto")
    p.add_argument("--paper", action="store_true", help="timing only: the paper's DiT-S/2 -> DiT-XL/2 pair at 256 px "
                                                        "with random weights (a GPU, bf16)")
    p.add_argument("--paper-archs", nargs=2, default=["dit_small_patch2_256", "dit_xlarge_patch2_256"])
    p.add_argument("--paper-steps", type=int, default=100)
    args = p.parse_args()
    if args.paper:
        return paper_timing(args)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import zoo
    from zoo.eval.generative import FrechetDistance, label_accuracy, label_classifier
    from zoo.eval.sampling import TStitch, forward_flops, make_scheduler, sample, sampling_flops

    for name in (SMALL, LARGE):
        ensure_published(name)
    small, large = zoo.load(SMALL), zoo.load(LARGE)
    f_small, f_large = forward_flops(small), forward_flops(large)
    print(f"{SMALL}: {f_small / 1e6:.2f} MFLOPs a forward; {LARGE}: {f_large / 1e6:.2f} (x{f_large / f_small:.1f})")

    try:
        backbone = zoo.load(args.backbone)
    except zoo.ZooError as e:
        raise SystemExit(f"feature backbone {args.backbone!r}: {e}; run `zoo demo` first (it publishes the default) "
                         "or pass --backbone NAME") from None
    train_x, train_y = digits("train")
    val_x, val_y = digits("val")
    fd = FrechetDistance(backbone)
    fd.add_real(train_x)
    classifier = label_classifier(backbone, train_x, train_y)
    ceiling = label_accuracy(val_x, val_y, classifier)
    fd_val = fd(val_x)
    print(f"real val digits: label accuracy {ceiling:.1f}%, FD to train {fd_val:.2f} (features: {args.backbone})")

    labels = [i % 10 for i in range(args.n)]
    rows, grids = [], {}
    for scheduler, steps in SCHEDULERS.items():
        for r in args.fractions:
            stitched = TStitch(small, large, fraction=r)
            for seed in args.seeds:
                res = sample(stitched, make_scheduler(scheduler), labels, steps=steps, guidance_scale=args.guidance,
                             generator=torch.Generator().manual_seed(seed), progress=False)
                row = {"scheduler": scheduler, "steps": steps, "r": r, "seed": seed, "seconds": res.seconds,
                       "ms_per_image": 1000 * res.seconds / args.n,
                       "mflops_per_image": sampling_flops(stitched, res.trace, args.guidance) / 1e6,
                       "small_steps": res.trace.count(0), "fd": fd(res.images),
                       "accuracy": label_accuracy(res.images, torch.tensor(labels), classifier),
                       "trace": stitched.trace_string()}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                if seed == args.seeds[0]:
                    grids.setdefault(scheduler, []).append((r, res.images[:20]))

    summary = summarize(rows, args.seeds)
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "ceiling_accuracy": ceiling,
                                                  "fd_real_val": fd_val, "backbone": args.backbone, "n": args.n,
                                                  "guidance": args.guidance, "flops": [f_small, f_large]}, indent=2))
    print_table(summary, ceiling, fd_val, args)
    plot(summary, out / "pareto.png", fd_val)
    from zoo.engine.plots import image_grid

    for scheduler, items in grids.items():
        image_grid([imgs for _, imgs in items], out / f"samples_{scheduler}.png", mean=(0.0,), std=(1.0,), scale=4,
                   row_labels=[f"r={r:.1f}" for r, _ in items])
    print(f"wrote {out}/results.json, pareto.png, samples_*.png")


def paper_timing(args: argparse.Namespace) -> None:
    """The paper's pair at its scale with random weights (timing does not depend on them): DiT-S/2 and DiT-XL/2 on
    32x32x4 latents, 8 images, DDIM 100 steps, CFG 1.5 (the paper's speed setting: seconds for 8 images), bf16 on
    CUDA; the denoising loop only (the VAE decode is the same for every r)."""
    import zoo
    from zoo.eval.sampling import TStitch, forward_flops, make_scheduler, sample, sampling_flops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = args.paper_archs
    small, large = (zoo.create_model(n).to(device, dtype).eval() for n in names)
    print(f"{names[0]} {forward_flops(small) / 1e9:.2f} GFLOPs, {names[1]} {forward_flops(large) / 1e9:.2f} GFLOPs a "
          f"forward (2 per multiply-add) on {device} {dtype}; DDIM {args.paper_steps} steps, 8 images, CFG 1.5")
    labels = list(range(8))
    rows = []
    for r in args.fractions:
        stitched = TStitch(small, large, fraction=r)
        sample(stitched, make_scheduler("ddim"), labels, steps=5, guidance_scale=1.5, progress=False)  # warm-up
        times = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            res = sample(stitched, make_scheduler("ddim"), labels, steps=args.paper_steps, guidance_scale=1.5, progress=False,
                         generator=torch.Generator().manual_seed(0))
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(res.seconds)
        rows.append({"r": r, "seconds": min(times), "flops": sampling_flops(stitched, res.trace, 1.5)})
    print("| r | s / 8 images | TFLOPs / image | speedup (FLOPs) | speedup (measured) | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        pred, meas = rows[0]["flops"] / row["flops"], rows[0]["seconds"] / row["seconds"]
        print(f"| {row['r']:.1f} | {row['seconds']:.2f} | {row['flops'] / 1e12:.2f} | {pred:.2f}x | {meas:.2f}x | "
              f"{meas / pred:.2f} |")


def summarize(rows: list[dict], seeds: list[int]) -> list[dict]:
    out = []
    for scheduler in SCHEDULERS:
        base = [r for r in rows if r["scheduler"] == scheduler and r["r"] == 0.0]
        t0 = statistics.mean(r["seconds"] for r in base)
        f0 = base[0]["mflops_per_image"]
        for frac in sorted({r["r"] for r in rows if r["scheduler"] == scheduler}):
            mine = [r for r in rows if r["scheduler"] == scheduler and r["r"] == frac]
            t = statistics.mean(r["seconds"] for r in mine)
            predicted, measured = f0 / mine[0]["mflops_per_image"], t0 / t
            out.append({"scheduler": scheduler, "steps": mine[0]["steps"], "r": frac, "small_steps": mine[0]["small_steps"],
                        "fd": statistics.mean(r["fd"] for r in mine), "fd_sd": _sd([r["fd"] for r in mine]),
                        "accuracy": statistics.mean(r["accuracy"] for r in mine),
                        "accuracy_sd": _sd([r["accuracy"] for r in mine]),
                        "ms_per_image": statistics.mean(r["ms_per_image"] for r in mine),
                        "mflops_per_image": mine[0]["mflops_per_image"], "speedup_flops": predicted,
                        "speedup_measured": measured, "speedup_ratio": measured / predicted})
    return out


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(summary: list[dict], ceiling: float, fd_val: float, args: argparse.Namespace) -> None:
    print(f"\nT-Stitch on digits: {SMALL} for the first r of the steps, {LARGE} after; n = {args.n} per run, "
          f"seeds {args.seeds} (mean ± sd), CFG {args.guidance}, features {args.backbone}. Real val digits: "
          f"accuracy {ceiling:.1f}%, FD {fd_val:.2f}.\n")
    print("| scheduler | r | small steps | FD ↓ | label acc. (%) | ms / image | MFLOPs / image | speedup (FLOPs) | "
          "speedup (measured) | measured / predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['scheduler']} {s['steps']} | {s['r']:.1f} | {s['small_steps']} | {s['fd']:.2f} ± {s['fd_sd']:.2f} | "
              f"{s['accuracy']:.1f} ± {s['accuracy_sd']:.1f} | {s['ms_per_image']:.2f} | {s['mflops_per_image']:.0f} | "
              f"{s['speedup_flops']:.2f}x | {s['speedup_measured']:.2f}x | {s['speedup_ratio']:.2f} |")


def plot(summary: list[dict], path: Path, fd_val: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for scheduler in SCHEDULERS:
        mine = [s for s in summary if s["scheduler"] == scheduler]
        xs = [s["ms_per_image"] for s in mine]
        for ax, key in zip(axes, ("fd", "accuracy")):
            ys = [s[key] for s in mine]
            ax.plot(xs, ys, "o-", label=f"{scheduler} {mine[0]['steps']} steps")
            for s, x, y in zip(mine, xs, ys):
                ax.annotate(f"{s['r']:.1f}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axes[0].axhline(fd_val, color="grey", ls=":", label="real val digits")
    axes[0].set(xlabel="ms per image (CPU, 2 threads)", ylabel="Fréchet distance (lower is better)",
                title="quality vs time; labels: fraction r of small-model steps")
    axes[1].set(xlabel="ms per image (CPU, 2 threads)", ylabel="label accuracy (%)", title="conditioning kept")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"done in {(time.time() - start) / 60:.1f} min")
