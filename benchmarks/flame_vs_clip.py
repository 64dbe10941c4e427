"""Experiment: with little image-text data, does a frozen pretrained LM as text encoder (FLAME) beat a text tower
trained from scratch (CLIP), most of all on long captions?

Same data (2000 built-in scenes: image, noisy alt-text, exact sentence, long paragraph), steps, batch, seed and
image tower shape (ViT-T/4 on 32 px: 192 wide, 6 blocks, 3 heads), both with a sigmoid loss (t = 10, b = -10):
- FLAME: the frozen `llama_nano.scenes_captions` (recipe `lm_llama_nano_scenes`: text only, 10000 scenes'
  captions) embeds every caption once (1 raw prompt on the alt-text, 3 facets on the sentence, 7 on the
  paragraph); only the ViT and the projector train, on 6 of the 11 rows per image (`flame` recipe).
- CLIP: open_clip's `ViT-tiny-4-32` (its text transformer: 3 blocks, 128 wide, 32-token context, from scratch),
  SigLIP loss, each step one caption per image: the alt-text with p = 0.1, else the sentence or the paragraph
  (`clip` recipe, captions mix:0.9 over quality [exact, long]).
Evaluated on 500 held-out scenes: image<->text R@1 with the short captions (the sentence; FLAME reads it in its
one raw prompt) and with the long ones (the paragraph; FLAME's 7-facet long prompt, averaged), zero-shot
classification of the largest shape, and linear probes on the frozen image features (scenes' shape; digits,
real handwriting, as transfer). Repeated over seeds; prints a table and writes a bar chart.

    python benchmarks/flame_vs_clip.py --seeds 0 1        # ~40 minutes on 2 cores (the LM: once, ~8 min more)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

METHODS = {"flame": "FLAME (frozen LM)", "clip": "CLIP (text tower from scratch)"}
METRICS = ("short R@1 i2t", "short R@1 t2i", "long R@1 i2t", "long R@1 t2i", "zero-shot top-1",
           "linear scenes top-1", "linear digits top-1")
LM = "llama_nano.scenes_captions"
CAPTIONS = {"raw": "noisy", "short": "exact", "long": "long"}


def make_data(out: Path, n_train: int) -> dict:
    from zoo.data import write_shards
    from zoo.data.builtin import generate
    from zoo.registry import DATASETS

    classes = list(DATASETS.get("scenes").meta["classes"])
    paths: dict = {"classes": classes}
    sets = (("pretrain", "scenes", "train", n_train, 0), ("probe-train", "scenes", "train", 1000, 7),
            ("probe-val", "scenes", "val", 500, 0), ("digits-train", "digits", "train", 1438, 0),
            ("digits-val", "digits", "val", 359, 0))
    for name, dataset, split, n, seed in sets:
        folder = out / "data" / name
        if not (folder / "sizes.json").is_file():
            write_shards(generate(dataset, n, seed=seed, split=split), folder, maxcount=500, total=n,
                         desc=f"{dataset}/{name}", info={"name": dataset, "split": split})
        paths[name] = str(folder / "*.tar")
    return paths


@torch.no_grad()
def lm_answers(n: int = 200) -> float:
    """% of FLAME's facet questions the frozen LM answers right (its next token after `:"` starts the one-word
    answer) on held-out scenes' long captions: what the LM knows of the scenes before any image is seen."""
    import zoo
    from zoo.data.builtin import generate
    from zoo.models.flame import PROMPTS
    from zoo.recipes.lm import scene_answers

    lm = zoo.load(LM)
    right = total = 0
    for s in generate("scenes", n, seed=0, split="val", size=16):
        head, pieces = PROMPTS["long"].texts(s["meta"]["captions"]["long"])
        for piece, answer in zip(pieces, scene_answers(s["meta"])):
            ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(head + piece, add_special_tokens=False).input_ids
            want = lm.tokenizer(answer, add_special_tokens=False).input_ids[0]
            right += int(lm(torch.tensor([ids])).logits[0, -1].argmax() == want)
            total += 1
    return 100 * right / total


@torch.no_grad()
def lm_text_match(n: int = 300) -> float:
    """R@1 (%) of finding a held-out scene's paragraph (7-facet long prompt, averaged) from its sentence (raw
    prompt) among n scenes, with the frozen LM's embeddings alone: how much of *which scene* they hold."""
    import torch.nn.functional as F

    import zoo
    from zoo.data.builtin import generate
    from zoo.models.flame import FacetTokenizer, facet_embeddings

    lm = zoo.load(LM)
    caps = [s["meta"]["captions"] for s in generate("scenes", n, seed=0, split="val", size=16)]

    def embed(kind: str, key: str) -> torch.Tensor:
        tok = FacetTokenizer(lm.tokenizer, kind)
        rows = [facet_embeddings(lm, tok([c[key] for c in caps[i : i + 50]])).mean(1) for i in range(0, n, 50)]
        return F.normalize(torch.cat(rows), dim=-1)

    sim = embed("raw", "exact") @ embed("long", "long").T
    return 100 * (sim.argmax(1) == torch.arange(n)).float().mean().item()


def linear(tower: torch.nn.Module, train: str, val: str) -> float:
    from zoo.eval.features import extract_features
    from zoo.eval.linear import linear_probe

    kw = dict(variants=("avg",), batch_size=256)
    xtr, ytr = extract_features(tower, train, desc="probe train", **kw)
    xva, yva = extract_features(tower, val, desc="probe val", **kw)
    return linear_probe(xtr, ytr, xva, yva).top1


def evaluate(method: str, tower: torch.nn.Module, whole: torch.nn.Module, data: dict) -> dict[str, float]:
    from zoo.eval.retrieval import retrieval_eval
    from zoo.eval.zeroshot import zero_shot_eval

    short_tok = whole.tokenizer
    long_tok = whole.text_tokenizer("long") if method == "flame" else whole.tokenizer
    short = retrieval_eval(whole, short_tok, data["probe-val"], caption=("exact",), desc="retrieval short")
    long = retrieval_eval(whole, long_tok, data["probe-val"], caption=("long",), desc="retrieval long")
    zs = zero_shot_eval(whole, short_tok, data["probe-val"], data["classes"],
                        templates=("a scene where the largest object is a {}.",))
    return {"short R@1 i2t": short["image_to_text_R@1"], "short R@1 t2i": short["text_to_image_R@1"],
            "long R@1 i2t": long["image_to_text_R@1"], "long R@1 t2i": long["text_to_image_R@1"],
            "zero-shot top-1": zs["top1"],
            "linear scenes top-1": linear(tower, data["probe-train"], data["probe-val"]),
            "linear digits top-1": linear(tower, data["digits-train"], data["digits-val"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="flame-vs-clip")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--n", type=int, default=2000, help="image-text pairs to pretrain on")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="the methods to train; the others' results are read from an earlier run in --out (same budget)")
    args = ap.parse_args()

    import zoo
    from zoo.engine.plots import bars
    from zoo.engine.trainer import pretrain
    from zoo.eval.text_embedding import embed_text_shards
    from zoo.recipes.flame import ensure_lm

    out = Path(args.out)
    t0 = time.perf_counter()
    ensure_lm(LM)  # trains lm_llama_nano_scenes once when the store lacks it
    data = make_data(out, args.n)
    print(f"the frozen LM answers {lm_answers():.1f}% of the facet questions on held-out long captions; its "
          f"embeddings find a scene's paragraph from its sentence at R@1 {lm_text_match():.1f}% (of 300)", flush=True)
    embedded = out / "data" / "pretrain-flame"
    if not (embedded / "dataset.json").is_file():
        embed_text_shards(LM, data["pretrain"], embedded, captions=CAPTIONS, batch_size=64)
    common = [f"schedule.steps={args.steps}", f"data.batch_size={args.batch}", "data.num_workers=1",
              "output.checkpoint_every=0", "eval.final=[]", f"schedule.warmup_steps={max(1, args.steps // 10)}"]
    runs = {
        "flame": ("flame_vit_tiny_patch4_32_scenes", str(embedded / "*.tar"), "vit_tiny_patch4_32",
                  "flame_vit_tiny_patch4_32", [f"method.lm={LM}"]),
        "clip": ("clip_nano_patch4_32_scenes", data["pretrain"], "clip_vit_tiny_patch4_32", "clip_tiny_patch4_32",
                 ["model.arch=clip_tiny_patch4_32", "method.loss=siglip", "method.captions=mix:0.9",
                  "method.alt_caption=noisy", "method.quality_captions=[exact,long]", "optim.weight_decay=0.5",
                  "optim.betas=[0.9,0.95]"]),
    }
    results: dict[str, dict[int, dict[str, float]]] = {m: {} for m in args.methods}
    earlier = out / "results.json"
    if earlier.is_file():  # the methods not rerun come from an earlier run with the same data and budget
        old = json.loads(earlier.read_text())
        same = all(old["args"].get(k) == getattr(args, k) for k in ("seeds", "steps", "n", "batch"))
        for m, per_seed in (old["results"].items() if same else ()):
            if m not in results:
                results[m] = {int(seed): r for seed, r in per_seed.items()}
                print(f"{METHODS[m]}: results of the earlier run in {earlier}", flush=True)
    for seed in args.seeds:
        for method in args.methods:
            recipe, train, tower_arch, whole_arch, extra = runs[method]
            tag = f"fvc_{method}_s{seed}"
            print(f"== {METHODS[method]}, seed {seed}: {args.steps} steps x {args.batch}", flush=True)
            t = time.perf_counter()
            res = pretrain(recipe, data=train, run_dir=out / "runs" / tag, overwrite=True,
                           overrides=[*common, *extra, f"seed={seed}", f"output.publish={tower_arch}.{tag}"])
            train_s = time.perf_counter() - t
            tower, whole = zoo.load(f"{tower_arch}.{tag}"), zoo.load(f"{whole_arch}.{tag}")
            results[method][seed] = {**evaluate(method, tower, whole, data), "final loss": res.metrics[-1]["loss"],
                                     "train s": train_s}
            print(json.dumps(results[method][seed]), flush=True)

    shown = [m for m in METHODS if m in results]
    mean = {m: {k: statistics.mean(r[s][k] for s in r) for k in METRICS} for m, r in results.items()}
    spread = {m: {k: statistics.pstdev([r[s][k] for s in r]) for k in METRICS} for m, r in results.items()}
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x batch {args.batch} on {args.n} scenes pairs; "
          f"mean ± std over seeds (%); chance: R@1 0.2, zero-shot / linear scenes 16.7, digits 10")
    both = len(shown) == 2
    print("| metric | " + " | ".join(METHODS[m] for m in shown) + (" | FLAME − CLIP |" if both else " |"))
    print("|---|" + "---|" * (len(shown) + both))
    for k in METRICS:
        cells = [f"{mean[m][k]:.1f} ± {spread[m][k]:.1f}" for m in shown]
        print(f"| {k} | " + " | ".join(cells) + (f" | {mean['flame'][k] - mean['clip'][k]:+.1f} |" if both else " |"))
    if both:
        per_seed = {k: [results["flame"][s][k] - results["clip"][s][k] for s in args.seeds] for k in METRICS}
        print("\nFLAME − CLIP per seed: " + "; ".join(f"{k}: {', '.join(f'{d:+.1f}' for d in v)}"
                                                  for k, v in per_seed.items()))
    for m in shown:
        secs = statistics.mean(r["train s"] for r in results[m].values())
        print(f"{METHODS[m]}: {secs:.0f} s training per run")
    chart = bars(list(METRICS), {METHODS[m]: [mean[m][k] for k in METRICS] for m in shown},
                 out / "flame_vs_clip.png", errors={METHODS[m]: [spread[m][k] for k in METRICS] for m in shown},
                 title=f"FLAME vs CLIP on {args.n} scenes pairs ({len(args.seeds)} seeds, {args.steps} steps)")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"chart: {chart}; results: {out / 'results.json'}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
