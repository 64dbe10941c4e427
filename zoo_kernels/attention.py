"""Scaled dot-product attention with call-time backend selection.

Tensors are (B, H, N, D) throughout, as in `torch.nn.functional.scaled_dot_product_attention`;
layout conversions for backends that want (B, N, H, D) live here and nowhere else.

Backends: `sdpa` (PyTorch SDPA: the CPU path, always available), `math` (the explicit reference),
`xformers` (memory-efficient attention on CUDA), `flex` (PyTorch FlexAttention with block masks, on
CUDA: PyTorch has no FlexAttention backward on the CPU), `triton` (our flash-attention kernel: on CUDA,
or on the CPU through Triton's interpreter when TRITON_INTERPRET=1). Nothing is imported or probed
before the first call; `ZOO_ATTENTION=name` forces one, and a forced backend that cannot run here is
an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.kernels.triton_support import triton_unavailable

Mask = torch.Tensor | None


# ---------------------------------------------------------------- masks


def combined_mask(
    q: torch.Tensor, k: torch.Tensor, attn_mask: Mask, key_padding_mask: Mask, is_causal: bool
) -> torch.Tensor | None:
    """One mask broadcastable to (B, H, Nq, Nk): bool (True = attend) unless `attn_mask` is additive.

    `key_padding_mask` (B, Nk) is True at padding keys (PyTorch's nn.MultiheadAttention convention);
    `is_causal` is SDPA's top-left aligned lower triangle."""
    nq, nk = q.shape[-2], k.shape[-2]
    allowed: torch.Tensor | None = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], nk):
            raise ZooError(f"key_padding_mask must be (batch, keys) = {(q.shape[0], nk)}, got {tuple(key_padding_mask.shape)}")
        allowed = ~key_padding_mask.bool()[:, None, None, :]
    if is_causal:
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask if allowed is None else attn_mask & allowed
    if allowed is None:
        return attn_mask
    return attn_mask.masked_fill(~allowed, -math.inf)


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive bias; an additive one unchanged."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


# ---------------------------------------------------------------- backends (one signature)


def _math(q, k, v, mask=None, dropout_p=0.0, scale=None):
    """The explicit reference: softmax(q kᵀ·scale + mask) v."""
    weights = _weights(q, k, mask, scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _weights(q, k, mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1)


def _sdpa(q, k, v, mask=None, dropout_p=0.0, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _xformers(q, k, v, mask=None, dropout_p=0.0, scale=None):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants the bias's last dimension 8-aligned in memory: allocate padded, then slice
        padded = torch.empty(b, h, nq, -(-nk // 8) * 8, dtype=q.dtype, device=q.device)
        bias = padded[..., :nk]
        bias.copy_(_as_bias(mask, q.dtype).expand(b, h, nq, nk))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def _flex(q, k, v, mask=None, dropout_p=0.0, scale=None, block_mask=None):
    """FlexAttention: a bool mask becomes a block mask (blocks with no allowed key are skipped); an
    additive mask becomes a score_mod. Compiled once per process on CUDA (eager elsewhere)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if dropout_p > 0.0:
        raise ZooError("the flex attention backend has no dropout; use ZOO_ATTENTION=sdpa or dropout_p=0")
    score_mod = None
    if mask is not None and block_mask is None:
        b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if mask.dtype == torch.bool:
            full = mask.expand(b, h, nq, nk)
            block_mask = create_block_mask(lambda bi, hi, qi, ki: full[bi, hi, qi, ki],
                                           b, h, nq, nk, device=q.device)
        else:
            bias = mask.expand(b, h, nq, nk).to(q.dtype)
            score_mod = lambda score, bi, hi, qi, ki: score + bias[bi, hi, qi, ki]  # noqa: E731
    return _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale)


@functools.lru_cache(maxsize=2)
def _flex_fn(cuda: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if cuda else flex_attention


def _triton(q, k, v, mask=None, dropout_p=0.0, scale=None):
    from zoo.kernels._attention_triton import triton_attention

    if dropout_p > 0.0:
        raise ZooError("the triton attention backend has no dropout; use ZOO_ATTENTION=sdpa or dropout_p=0")
    return triton_attention(q, k, v, attn_mask=mask, scale=scale)


BACKENDS: dict[str, Callable] = {"sdpa": _sdpa, "math": _math, "xformers": _xformers, "flex": _flex, "triton": _triton}


# ---------------------------------------------------------------- availability and choice


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Each backend -> 'available' or why it cannot run on `device`, for `zoo info --kernels` and tests."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    status = {"sdpa": "available", "math": "available"}
    if not cuda:
        status["xformers"] = "needs a CUDA device"
    elif not _importable("xformers"):
        status["xformers"] = "xformers is not installed (pip install 'zoo[gpu]')"
    else:
        status["xformers"] = "available"
    if not _importable("torch.nn.attention.flex_attention"):
        status["flex"] = f"this PyTorch ({torch.__version__}) has no FlexAttention"
    else:
        status["flex"] = "available" if cuda else "needs a CUDA device (PyTorch's FlexAttention has no CPU backward)"
    why = triton_unavailable(device)
    status["triton"] = why or ("available" if cuda else "available (Triton's interpreter, TRITON_INTERPRET=1: slow)")
    return status


def forced_backend(device: torch.device) -> str | None:
    """The backend ZOO_ATTENTION names, checked to run on `device`, or None when unset."""
    forced = os.environ.get("ZOO_ATTENTION", "").strip().lower()
    if not forced:
        return None
    if forced not in BACKENDS:
        raise ZooError(f"ZOO_ATTENTION={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    why = available_backends(device)[forced]
    if not why.startswith("available"):
        raise ZooError(f"ZOO_ATTENTION={forced} cannot run here: {why}; unset ZOO_ATTENTION to pick automatically")
    return forced


def choose_backend(q: torch.Tensor) -> str:
    """ZOO_ATTENTION if set; else xformers on CUDA when importable; else PyTorch SDPA."""
    forced = forced_backend(q.device)
    if forced:
        return forced
    if q.is_cuda and _importable("xformers"):
        return "xformers"
    return "sdpa"


# ---------------------------------------------------------------- the entry points


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v for (B, H, N, D) tensors.

    `attn_mask`: bool (True = attend) or additive, broadcastable to (B, H, Nq, Nk);
    `key_padding_mask` (B, Nk): True at padding keys; `is_causal`: SDPA's top-left lower triangle."""
    backend = choose_backend(q)
    if attn_mask is None and key_padding_mask is None:  # the backends' own fast paths for no mask / causal
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        if backend == "xformers" and is_causal:
            import xformers.ops as xops

            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_bias=xops.LowerTriangularMask(), p=dropout_p, scale=scale)
            return out.transpose(1, 2)
    mask = combined_mask(q, k, attn_mask, key_padding_mask, is_causal)
    return BACKENDS[backend](q, k, v, mask, dropout_p=dropout_p, scale=scale)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The post-softmax attention maps (B, H, Nq, Nk), for analysis and pictures (rows sum to 1)."""
    return _weights(q, k, combined_mask(q, k, attn_mask, key_padding_mask, is_causal), scale)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: Sequence[int],
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Packed sequences of different lengths, attending only within themselves.

    q, k, v are (1, H, T, D) with T = sum(seqlens) (e.g. 2 global + N local crops of a batch, one after
    another); returns (1, H, T, D). CUDA: xformers' BlockDiagonalMask, else FlexAttention with a
    document mask; CPU: one dense call per distinct length (sequences of equal length batched)."""
    seqlens = [int(n) for n in seqlens]
    if q.dim() != 4 or q.shape[0] != 1:
        raise ZooError(f"attention_varlen wants packed (1, H, T, D) tensors, got {tuple(q.shape)}")
    if min(seqlens, default=0) < 1 or sum(seqlens) != q.shape[2] or k.shape[2] != q.shape[2]:
        raise ZooError(f"seqlens {seqlens[:8]}{'...' if len(seqlens) > 8 else ''} (sum {sum(seqlens)}) "
                       f"do not tile the {q.shape[2]} packed tokens of q/k/v")
    backend = forced_backend(q.device) or ("xformers" if q.is_cuda and _importable("xformers") else
                                            "flex" if q.is_cuda and dropout_p == 0.0 else "sdpa")
    if backend == "xformers":
        import xformers.ops as xops

        bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(seqlens)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        doc = torch.repeat_interleave(torch.arange(len(seqlens), device=q.device),
                                      torch.tensor(seqlens, device=q.device))
        t = q.shape[2]
        block_mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], 1, None, t, t, device=q.device)
        return _flex(q, k, v, dropout_p=dropout_p, scale=scale, block_mask=block_mask)
    return _grouped_by_length(BACKENDS[backend], q, k, v, seqlens, dropout_p, scale)


def _grouped_by_length(fn: Callable, q, k, v, seqlens: list[int], dropout_p: float, scale: float | None):
    """Dense attention per distinct sequence length: equal-length sequences stacked into one batch."""
    starts = [0]
    for n in seqlens[:-1]:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(seqlens):
        by_len.setdefault(n, []).append(i)
    pieces: list[torch.Tensor | None] = [None] * len(seqlens)
    for n, members in by_len.items():
        def stack(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :, starts[i] : starts[i] + n] for i in members], dim=0)

        out = fn(stack(q), stack(k), stack(v), None, dropout_p=dropout_p, scale=scale)
        for j, i in enumerate(members):
            pieces[i] = out[j : j + 1]
    return torch.cat(pieces, dim=2)
