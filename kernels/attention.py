"""Scaled dot-product attention with call-time backend selection.

Tensors are (B, H, N, D) throughout, as in `torch.nn.functional.scaled_dot_product_attention`;
layout conversions for backends that want (B, N, H, D) live here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from zoo.errors import ZooError


def _math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """The explicit reference: softmax(q k^T * scale + mask) v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        n, m = logits.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        logits = logits.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def _xformers(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    import xformers.ops as xops

    bias = None
    if is_causal:
        bias = xops.LowerTriangularMask()
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, -math.inf)
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


BACKENDS: dict[str, Callable] = {"sdpa": _sdpa, "math": _math, "xformers": _xformers}


def _xformers_importable() -> bool:
    return importlib.util.find_spec("xformers") is not None


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Each backend -> 'available' or the reason it is not, for `zoo info` and tests."""
    device = torch.device(device)
    status = {"sdpa": "available", "math": "available"}
    if device.type != "cuda":
        status["xformers"] = "needs a CUDA device"
    elif not _xformers_importable():
        status["xformers"] = "xformers is not installed (pip install 'zoo[gpu]')"
    else:
        status["xformers"] = "available"
    return status


def _choose(q: torch.Tensor) -> str:
    forced = os.environ.get("ZOO_ATTENTION", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ZooError(f"ZOO_ATTENTION={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        why = available_backends(q.device)[forced]
        if why != "available":
            raise ZooError(f"ZOO_ATTENTION={forced} cannot run here: {why}; unset ZOO_ATTENTION to pick automatically")
        return forced
    if q.is_cuda and _xformers_importable():
        return "xformers"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v for (B, H, N, D) tensors; a bool mask is True where attention is allowed."""
    backend = _choose(q)
    return BACKENDS[backend](q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
