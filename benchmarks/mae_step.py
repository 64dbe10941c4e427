"""One MAE training step (forward, backward, AdamW) of zoo's recipe vs a plain reference MAE.

The reference is the facebookresearch/mae model re-assembled here from timm's `Block`, `PatchEmbed`
and a fixed sin-cos position embedding, with `models_mae` parameter names, so zoo's weights load
into it unchanged (`MAE.official_state_dict()`): the script first checks that both compute the
same loss on the same images and masks, then times them alternately in one process.

Reported per model: img/s (median step), peak memory of a step above the memory held before it
(CUDA: max_memory_allocated; CPU: the process's peak RSS, reset through /proc/self/clear_refs),
and the step's FLOP/s (FLOPs counted by torch.utils.flop_counter) as a fraction of this machine's
measured large-matmul FLOP/s.

    python benchmarks/mae_step.py                       # CPU-sized: ViT-S/16 at 224, batch 16
    python benchmarks/mae_step.py --device cuda --batch 128 --amp bf16 --decoder 512 8 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch.utils.flop_counter import FlopCounterMode

from measure import peak_bytes, reset_peak, sync
from zoo.models.vit import sincos_pos_embed_2d
from zoo.recipes.mae import MAE, random_masking


class ReferenceMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT's computation from timm parts, with its parameter names."""

    def __init__(self, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio=4.0):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch = patch
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, *grid, 1), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dec_dim, *grid, 1), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dec_dim, dec_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B = imgs.shape[0]
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        N, D = x.shape[1], x.shape[2]
        ids_keep, ids_restore, mask = random_masking(B, N, 0.75, generator=generator, device=imgs.device)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        y = torch.cat([x[:, 1:], mask_tokens], dim=1)
        y = torch.gather(y, 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[2]))
        x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p, h = self.patch, imgs.shape[2] // self.patch
        target = imgs.reshape(B, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * h, p * p * 3)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(-1)
        return (loss * mask).sum() / mask.sum()


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """This machine's large-matmul FLOP/s (median of `repeats` n x n products)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decoder", type=int, nargs=3, default=(256, 4, 8), metavar=("DIM", "DEPTH", "HEADS"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=("no", "bf16"), default="no")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true",
                    help="add a row: zoo MAE with each block through torch.compile, as the engine's `compile: true`")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dd, ddepth, dheads = args.decoder
    ours = MAE(args.arch, decoder_dim=dd, decoder_depth=ddepth, decoder_heads=dheads).to(device)
    enc = ours.encoder
    size = enc.patch_embed.img_size[0]
    ref = ReferenceMAE(size, ours.patch_size, enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads,
                       dd, ddepth, dheads).to(device)
    ref.load_state_dict(ours.official_state_dict(), strict=True)
    imgs = torch.randn(args.batch, 3, size, size, device=device)

    def step_fn(model, opt, seed):
        def step():
            gen = torch.Generator(device=device).manual_seed(seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                loss = model(imgs, generator=gen) if model is ref else model(imgs, generator=gen)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    with torch.no_grad():  # same weights, same masks: same loss, or the comparison is meaningless
        a = ours(imgs, generator=torch.Generator(device=device).manual_seed(1))[0]
        b = ref(imgs, generator=torch.Generator(device=device).manual_seed(1))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"reference and zoo MAE disagree: {a.item()} vs {b.item()}"

    models = {"zoo MAE": ours, "timm-Block reference": ref}
    if args.compile:
        import copy

        compiled = copy.deepcopy(ours)
        for block in compiled.repeated_blocks():
            block.compile()
        models["zoo MAE, compile: true"] = compiled
    steps = {name: step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4), 1) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, int] = {}
    flops: dict[str, int] = {}
    for name, step in steps.items():  # warm-up, FLOP count, then the peak memory of one step
        step(), step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
        base = reset_peak(device)
        step()
        peaks[name] = peak_bytes(device) - base
    for _ in range(args.steps):  # alternate, so drift in the machine's speed hits both alike
        for name, step in steps.items():
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t)

    mm_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak_flops = matmul_flops(device, mm_dtype, 8192 if device.type == "cuda" else 2048)
    print(f"MAE step: {args.arch}, decoder {dd}d{ddepth}b{dheads}h, batch {args.batch}, {device.type}, amp={args.amp}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.steps} alternating steps each")
    print(f"large-matmul peak ({mm_dtype}): {peak_flops / 1e9:.1f} GFLOP/s\n")
    print("| model | ms/step (median) | img/s | peak step memory (MiB) | GFLOP/step | GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    rate = {}
    for name in models:
        med = statistics.median(times[name])
        rate[name] = args.batch / med
        achieved = flops[name] / med
        print(f"| {name} | {med * 1e3:.1f} | {rate[name]:.1f} | {peaks[name] / 2**20:.0f} | "
              f"{flops[name] / 1e9:.2f} | {achieved / 1e9:.1f} | {achieved / peak_flops:.1%} |")
    print()
    for name in models:
        if name != "timm-Block reference":
            print(f"{name} / reference: throughput {rate[name] / rate['timm-Block reference']:.2f}x (target >= 1.0x), "
                  f"peak memory {peaks[name] / max(peaks['timm-Block reference'], 1):.2f}x")


if __name__ == "__main__":
    main()
