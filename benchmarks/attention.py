"""zoo.kernels side by side: every attention backend that runs here, the packed variable-length
paths, and the fused attention-distribution KL against its explicit computation.

For N in {65, 197, 785} (ViT-B/16 tokens at 128, 224 and 448 px): forward + backward time (median)
and the peak memory one call adds (CUDA: max_memory_allocated; CPU: peak RSS, see measure.py).
Backends that cannot run on the device are listed with the reason. On the CPU, Triton kernels run
only in Triton's interpreter, far too slow to time: there the fused KL's memory is computed from
the shapes (and labelled so), not measured.

    python benchmarks/attention.py                          # this machine's CPU
    python benchmarks/attention.py --device cuda --batch 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch

from measure import median_ms, peak_mib
from zoo.kernels import attention_kl, attention_kl_reference
from zoo.kernels.attention import attention, attention_varlen, available_backends

NS = (65, 197, 785)


def fwd_bwd(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    """A closure running fn(*tensors) forward and backward (gradients freed after)."""
    def run() -> None:
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        (out.float().sum() if out.dim() else out).backward()
    return run


def with_backend(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        old = os.environ.get("ZOO_ATTENTION")
        os.environ["ZOO_ATTENTION"] = name
        try:
            fn()
        finally:
            if old is None:
                os.environ.pop("ZOO_ATTENTION", None)
            else:
                os.environ["ZOO_ATTENTION"] = old
    return run


def padded_varlen(q, k, v, seqlens):
    """The alternative to packing: pad every sequence to the longest, mask the padding keys."""
    longest, h, d = max(seqlens), q.shape[1], q.shape[3]
    def pad(x):
        out = x.new_zeros(len(seqlens), h, longest, d)
        start = 0
        for i, n in enumerate(seqlens):
            out[i, :, :n] = x[0, :, start : start + n]
            start += n
        return out
    key_pad = torch.arange(longest, device=q.device)[None, :] >= torch.tensor(seqlens, device=q.device)[:, None]
    out = attention(pad(q), pad(k), pad(v), key_padding_mask=key_pad)
    return torch.cat([out[i : i + 1, :, :n] for i, n in enumerate(seqlens)], dim=2)


def per_sequence_varlen(q, k, v, seqlens):
    """The naive alternative: one attention call per sequence."""
    outs, start = [], 0
    for n in seqlens:
        s = slice(start, start + n)
        outs.append(attention(q[:, :, s], k[:, :, s], v[:, :, s]))
        start += n
    return torch.cat(outs, dim=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 4 on the CPU")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64, help="head dim")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ns", type=int, nargs="+", default=NS)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    b = args.batch or (32 if device.type == "cuda" else 4)
    h, d = args.heads, args.dim
    status = available_backends(device)
    runnable = [n for n, why in status.items() if why == "available"]
    print(f"attention, forward + backward: batch {b}, {h} heads x {d}, {args.dtype}, {device.type}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}")
    for name, why in status.items():
        if why != "available":
            print(f"  (not run: {name}: {why})")

    print("\n| N | backend | ms | peak MiB |\n|---|---|---|---|")
    for n in args.ns:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for name in runnable:
            run = with_backend(name, fwd_bwd(lambda q, k, v: attention(q, k, v), q, k, v))
            print(f"| {n} | {name} | {median_ms(run, args.repeats, device):.2f} | {peak_mib(run, device):.1f} |")

    # multi-crop packing: per image 2 global crops of N tokens + 6 local crops of ~N/4 tokens
    print("\n| global N | packed tokens | path | ms | peak MiB |\n|---|---|---|---|---|")
    for n in args.ns:
        local = max(n // 4, 1)
        seqlens = [n, n] * b + [local] * (6 * b)
        t = sum(seqlens)
        q, k, v = (torch.randn(1, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        paths = {"attention_varlen": lambda q, k, v: attention_varlen(q, k, v, seqlens),
                 "padded + key mask": lambda q, k, v: padded_varlen(q, k, v, seqlens),
                 "one call per sequence": lambda q, k, v: per_sequence_varlen(q, k, v, seqlens)}
        for name, fn in paths.items():
            run = fwd_bwd(fn, q, k, v)
            print(f"| {n} | {t} | {name} | {median_ms(run, args.repeats, device):.2f} | {peak_mib(run, device):.1f} |")

    # the fused attention-distribution KL (UNIP distillation) vs the explicit N x N computation
    fused_runs = status["triton"] == "available" and device.type == "cuda"
    print("\n| N | KL | ms | peak MiB |\n|---|---|---|---|")
    for n in args.ns:
        q_t, k_t = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(2))
        q_s, k_s = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        ref = fwd_bwd(lambda q_s, k_s: attention_kl_reference(q_t, k_t, q_s, k_s), q_s, k_s)
        print(f"| {n} | explicit (reference) | {median_ms(ref, args.repeats, device):.2f} | {peak_mib(ref, device):.1f} |")
        if fused_runs:
            fused = fwd_bwd(lambda q_s, k_s: attention_kl(q_t, k_t, q_s, k_s, backend="triton"), q_s, k_s)
            print(f"| {n} | fused (triton) | {median_ms(fused, args.repeats, device):.2f} | {peak_mib(fused, device):.1f} |")
        else:
            maps = 4 * b * h * n * n * 4 / 2**20  # logits and log-probabilities, teacher and student, fp32
            rows = 3 * b * h * n * 4 / 2**20  # lse teacher, lse student, row KL: fp32 per row
            print(f"| {n} | fused (triton) | not timed: {status['triton']} | computed: {rows:.2f} "
                  f"(row state) vs {maps:.1f} (explicit maps) |")


if __name__ == "__main__":
    main()
