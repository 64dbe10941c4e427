"""FLAME's offline text embedding: captions per second through a frozen LM, all 11 facet rows of a caption
(1 raw + 3 short + 7 long prompts; the long prompt's 7 facets in one pass), side by side per LM and batch size.

Random weights in the LM shapes zoo registers (`llama_nano`, `llama_tiny` at CPU scale; `llama_1b` and
FLAME's `mistral_nemo_12b` on a GPU, in bf16), the built-in scenes' captions, zoo's caption tokenizer (the
Hub tokenizers cannot be downloaded here; what counts for speed is the number of tokens, about one a word).

    python benchmarks/embed_text.py                                     # CPU: llama_nano, llama_tiny
    python benchmarks/embed_text.py --archs llama_1b mistral_nemo_12b --batch 32 128   # a GPU
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["llama_nano", "llama_tiny"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--captions", type=int, default=256, help="captions timed per setting")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    import zoo
    from zoo.data.builtin import generate
    from zoo.models.flame import CACHE_LAYOUT, FacetTokenizer, facet_embeddings
    from zoo.models.lm import default_dtype
    from zoo.recipes.flame import BUILTIN_CAPTIONS
    from zoo.recipes.lm import builtin_tokenizer

    device = torch.device(args.device)
    dtype = default_dtype(device)
    tok = builtin_tokenizer(500, 1024)
    scenes = [s["meta"]["captions"] for s in generate("scenes", args.captions, seed=0, size=16)]
    texts = {k: [c[BUILTIN_CAPTIONS[k]] for c in scenes] for k in CACHE_LAYOUT}
    rows = []
    for arch in args.archs:
        vocab = {} if arch.startswith(("llama_1b", "mistral")) else {"vocab_size": len(tok)}
        with torch.device(device):
            lm = zoo.create_model(arch, **vocab).to(dtype).eval().requires_grad_(False)
        tokenizers = {k: FacetTokenizer(tok, k) for k in CACHE_LAYOUT}
        for batch in args.batch:
            def run() -> int:
                tokens = 0
                for i in range(0, args.captions, batch):
                    for k, ft in tokenizers.items():
                        b = ft(texts[k][i : i + batch])
                        tokens += int(b["input_ids"].numel())
                        facet_embeddings(lm, b)
                return tokens

            with torch.no_grad():
                run_small = FacetTokenizer(tok, "long")(texts["long"][:2])
                facet_embeddings(lm, run_small)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                tokens = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t
            rows.append((arch, sum(p.numel() for p in lm.parameters()) / 1e6, str(device), str(dtype).removeprefix("torch."),
                         batch, args.captions / secs, 11 * args.captions / secs, tokens / secs))
        del lm
    print(f"\n{args.captions} built-in scenes captions, 11 rows each (1 raw + 3 short + 7 long facets)")
    print("| LM | params (M) | device | dtype | batch | captions/s | rows/s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, params, dev, dt, batch, cps, rps, tps in rows:
        print(f"| {arch} | {params:.1f} | {dev} | {dt} | {batch} | {cps:.1f} | {rps:.0f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
