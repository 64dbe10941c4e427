"""Elastic ViT (POA): the sub-networks of one intact ViT, run and extracted as plain zoo ViTs.

A sub-network of width D and depth L of a `VisionTransformer` (embed_dim D_max, depth L_max, fixed head
size) is a plain `VisionTransformer` of embed_dim D, depth L, D / head_dim heads and MLP hidden mlp_ratio·D,
whose parameters are the leading slices (POA's "order" mode) of the evenly spaced blocks `block_ids` of the
intact one. POA scales the input of every elastic Linear by max_in / active_in; that factor is folded into
the sliced weights (exact: W·(αx) = (αW)·x), so the intact model, every sub-network and every extracted model
run the same ViT forward.
"""

from __future__ import annotations

import copy
import functools
import operator
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath
from torch import Tensor

from zoo.errors import CheckpointMismatchError, ConfigError
from zoo.models.vit import VisionTransformer, vit_kwargs

# Block parameters sliced to their leading D entries (LayerNorms, LayerScale, output biases of width D).
_BLOCK_LEADING = frozenset({
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma",
    "attn.proj.bias", "mlp.fc2.bias",
})
_OUTER_LEADING = frozenset({
    "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias",
})


def block_ids(max_depth: int, depth: int) -> list[int]:
    """The intact blocks a depth-`depth` sub-network runs, evenly spaced with the first and last kept (POA Eq. 4).

    Bit for bit numpy's float64 `linspace(0, max_depth - 1, depth).astype(int)`, as the official code computes
    it (exact integer arithmetic truncates differently for some pairs, e.g. 31 -> 23)."""
    if not 1 <= depth <= max_depth:
        raise ConfigError(f"depth {depth} is outside 1..{max_depth}; valid depths: 1, 2, ..., {max_depth}")
    if depth == 1:
        return [0]
    step = (max_depth - 1) / (depth - 1)
    return [int(i * step) for i in range(depth - 1)] + [max_depth - 1]


def _valid_widths(max_width: int, head_dim: int) -> str:
    widths = list(range(head_dim, max_width + 1, head_dim))
    return ", ".join(map(str, widths)) if len(widths) <= 4 else f"{widths[0]}, {widths[1]}, ..., {widths[-1]}"


def check_dims(width: int, depth: int, max_width: int, max_depth: int, head_dim: int) -> None:
    """Refuse a (width, depth) that is not a sub-network of a (max_width, max_depth) ViT with this head size."""
    valid = f"valid widths: {_valid_widths(max_width, head_dim)}"
    try:
        width, depth = operator.index(width), operator.index(depth)
    except TypeError:
        raise ConfigError(f"width and depth must be integers, got {width!r} and {depth!r}; {valid}") from None
    if width <= 0 or width % head_dim:
        raise ConfigError(f"width {width} is not a positive multiple of the head size {head_dim}; {valid}")
    if width > max_width:
        raise ConfigError(f"width {width} exceeds the intact model's {max_width}; {valid}")
    if not 1 <= depth <= max_depth:
        raise ConfigError(f"depth {depth} is outside 1..{max_depth}; valid depths: 1, 2, ..., {max_depth}")


def check_size(vit: VisionTransformer, width: int, depth: int) -> None:
    """Refuse a (width, depth) that is not a sub-network of `vit`, naming the valid range."""
    check_dims(width, depth, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.head_dim)


def _intact_dims(sd: Mapping[str, Tensor]) -> tuple[int, int, int]:
    """(embed_dim, depth, mlp hidden) of the intact ViT a state dict holds."""
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    needed = ["patch_embed.proj.weight", f"blocks.{blocks[0] if blocks else 0}.mlp.fc1.weight"]
    if missing := [k for k in needed if k not in sd]:
        raise CheckpointMismatchError(f"not a ViT state dict: no {', '.join(missing)}; expected timm/zoo ViT keys")
    return sd[needed[0]].shape[0], blocks[-1] + 1, sd[needed[1]].shape[0]


def _scaled(weight: Tensor, alpha: float) -> Tensor:
    return weight if alpha == 1.0 else weight * alpha


def _lead(t: Tensor, *sizes: int) -> Tensor:
    """The leading `sizes` entries of t's first dims; t itself when that is all of it."""
    if all(t.shape[i] == n for i, n in enumerate(sizes)):
        return t
    return t[tuple(slice(0, n) for n in sizes)]


def _slice_block(key: str, name: str, t: Tensor, width: int, hidden: int, alpha: float, alpha_hidden: float) -> Tensor:
    if name in _BLOCK_LEADING:
        return _lead(t, width)
    if name == "attn.qkv.weight":  # rows [0, D) of each of the q, k and v blocks, input columns [:D]
        max_width = t.shape[1]
        if width == max_width:
            return t
        return _scaled(t.view(3, max_width, max_width)[:, :width, :width].reshape(3 * width, width), alpha)
    if name == "attn.qkv.bias":
        max_width = t.shape[0] // 3
        return t if width == max_width else t.view(3, max_width)[:, :width].reshape(3 * width)
    if name == "attn.proj.weight":
        return _scaled(_lead(t, width, width), alpha)
    if name == "mlp.fc1.weight":
        return _scaled(_lead(t, hidden, width), alpha)
    if name == "mlp.fc1.bias":
        return _lead(t, hidden)
    if name == "mlp.fc2.weight":
        return _scaled(_lead(t, width, hidden), alpha_hidden)
    raise CheckpointMismatchError(f"cannot slice {key}: elastic ViTs have plain pre-norm blocks (qkv, proj, "
                                  "fc1/fc2 MLP, LayerNorm, LayerScale); this block has another layer")


def slice_vit_state_dict(sd: Mapping[str, Tensor], width: int, depth: int, *, head_dim: int) -> dict[str, Tensor]:
    """The state dict of the (width, depth) sub-network of the intact ViT whose state dict is `sd` (zoo/timm
    keys): leading slices of the `block_ids` blocks, renumbered 0..depth-1, α folded into the Linear weights.

    The one slicing implementation (elastic training, extraction, official POA checkpoints); the results are
    differentiable slices of `sd`'s tensors, not copies, wherever no α applies."""
    max_width, max_depth, max_hidden = _intact_dims(sd)
    check_dims(width, depth, max_width, max_depth, head_dim)
    hidden = int(width * (max_hidden / max_width))  # the hidden width `Block` gives embed_dim=width
    alpha, alpha_hidden = max_width / width, max_hidden / hidden
    renumber = {b: j for j, b in enumerate(block_ids(max_depth, depth))}
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key.startswith("blocks."):
            _, b, name = key.split(".", 2)
            if int(b) in renumber:
                out[f"blocks.{renumber[int(b)]}.{name}"] = _slice_block(key, name, t, width, hidden, alpha, alpha_hidden)
        elif key in ("cls_token", "pos_embed"):
            out[key] = t if width == max_width else t[..., :width]
        elif key in _OUTER_LEADING:
            out[key] = _lead(t, width)
        elif key == "head.weight":  # a classifier reads the pooled width-D features: input columns [:D]
            out[key] = _scaled(t if width == max_width else t[:, :width], alpha)
        elif key == "head.bias":
            out[key] = t
        else:
            raise CheckpointMismatchError(f"cannot slice {key}: not a parameter of a plain ViT (timm/zoo names)")
    return out


def sliced_state_dict(vit: VisionTransformer, width: int, depth: int) -> dict[str, Tensor]:
    """The (width, depth) sub-network's state dict as differentiable slices of `vit`'s parameters (not detached),
    so a forward through it sends gradients into exactly the active slices of the shared weights."""
    return slice_vit_state_dict(vit.state_dict(keep_vars=True), width, depth, head_dim=vit.blocks[0].attn.head_dim)


def sub_kwargs(vit: VisionTransformer, width: int, depth: int) -> dict[str, Any]:
    """`VisionTransformer` arguments of the (width, depth) sub-network of `vit` (its other settings kept)."""
    return {**vit_kwargs(vit), "embed_dim": width, "depth": depth, "num_heads": width // vit.blocks[0].attn.head_dim}


def elastic_card(width: int, depth: int, max_width: int, max_depth: int) -> dict[str, Any]:
    """Which sub-network a model is, for its model card."""
    return {"width": width, "depth": depth, "block_ids": block_ids(max_depth, depth),
            "parent_width": max_width, "parent_depth": max_depth}


class _Call(nn.Module):
    """`torch.func.functional_call` runs `forward`: this one runs a named method of the skeleton ViT."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.vit, method)(*args, **kwargs)


@functools.lru_cache(maxsize=512)
def _skeleton(frozen_kwargs: tuple[tuple[str, Any], ...]) -> _Call:
    """A parameterless (meta-device) plain ViT of these arguments, every block with its own DropPath whose rate
    is set per call (so it matches the intact model's block-by-block rates)."""
    with torch.device("meta"):
        vit = VisionTransformer(**dict(frozen_kwargs))
    for blk in vit.blocks:
        blk.drop_path1, blk.drop_path2 = DropPath(0.0), DropPath(0.0)
    return _Call(vit)


def _bind(vit: VisionTransformer, width: int, depth: int) -> tuple[_Call, dict[str, Tensor]]:
    """The skeleton of the (width, depth) sub-network, set to `vit`'s mode, drop-path rates and gradient
    checkpointing, and the sliced parameters to run it with."""
    params = sliced_state_dict(vit, width, depth)
    kwargs = {**sub_kwargs(vit, width, depth), "drop_path_rate": 0.0}
    call = _skeleton(tuple(sorted(kwargs.items())))
    call.train(vit.training)
    call.vit.grad_checkpointing = getattr(vit, "grad_checkpointing", False)
    for blk, b in zip(call.vit.blocks, block_ids(len(vit.blocks), depth)):
        for mine, theirs in ((blk.drop_path1, vit.blocks[b].drop_path1), (blk.drop_path2, vit.blocks[b].drop_path2)):
            mine.drop_prob = getattr(theirs, "drop_prob", 0.0)
            mine.scale_by_keep = getattr(theirs, "scale_by_keep", True)
    return call, {f"vit.{k}": v for k, v in params.items()}


def _token(mask_token: Tensor | None, width: int) -> Tensor | None:
    return None if mask_token is None else mask_token[..., :width]


def _run(vit: VisionTransformer, width: int, depth: int, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """`method` of the (width, depth) sub-network, through the one ViT forward."""
    call, params = _bind(vit, width, depth)
    if call.vit.grad_checkpointing and call.training:
        # checkpointed blocks run again in backward, after functional_call has put the meta tensors back: run a
        # copy of the skeleton holding the slices instead, which lives as long as the autograd graph needs it
        bound = copy.deepcopy(call)
        for name, tensor in params.items():
            owner, _, leaf = name.rpartition(".")
            bound.get_submodule(owner)._parameters[leaf] = tensor
        return bound(method, *args, **kwargs)
    return torch.func.functional_call(call, params, (method, *args), kwargs, strict=True)


def elastic_forward_features(
    vit: VisionTransformer,
    x: Tensor,
    width: int,
    depth: int,
    *,
    mask: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> Tensor:
    """`forward_features` of the (width, depth) sub-network of `vit`: (B, prefix + N, width). `mask_token`, the
    intact model's (D_max,) or (1, 1, D_max) embedding, is sliced to the width."""
    return _run(vit, width, depth, "forward_features", (x,), {"mask": mask, "mask_token": _token(mask_token, width)})


def elastic_forward_features_list(
    vit: VisionTransformer,
    xs: Sequence[Tensor],
    width: int,
    depth: int,
    masks: Sequence[Tensor | None] | None = None,
    mask_token: Tensor | None = None,
    pack: bool | None = None,
) -> list[Tensor]:
    """`forward_features_list` (multi-crop) of the (width, depth) sub-network of `vit`."""
    kwargs = {"masks": masks, "mask_token": _token(mask_token, width), "pack": pack}
    return _run(vit, width, depth, "forward_features_list", (xs,), kwargs)


def extract(vit: VisionTransformer, width: int, depth: int) -> VisionTransformer:
    """The (width, depth) sub-network of `vit` as an independent plain zoo ViT (copied weights, α folded), which
    timm's `VisionTransformer(**timm_kwargs(sub))` loads strictly; `sub.elastic` says which sub-network it is."""
    kwargs = sub_kwargs(vit, width, depth)
    with torch.no_grad():
        sd = {k: v.detach().clone() for k, v in sliced_state_dict(vit, width, depth).items()}
    sub = VisionTransformer(**kwargs)
    sub.load_state_dict(sd, strict=True)
    sub.to(device=vit.pos_embed.device, dtype=vit.pos_embed.dtype)
    sub.pretrained_cfg = dict(vit.pretrained_cfg)
    sub.elastic = elastic_card(width, depth, vit.embed_dim, len(vit.blocks))
    if hasattr(vit, "zoo_arch"):  # publishable as the parent is: its arch, its arguments with the new shape
        sub.zoo_arch = vit.zoo_arch
        sub.zoo_args = {**getattr(vit, "zoo_args", {}), **{k: kwargs[k] for k in ("embed_dim", "depth", "num_heads")}}
    return sub


__all__ = [
    "block_ids", "check_dims", "check_size", "slice_vit_state_dict", "sliced_state_dict", "sub_kwargs", "elastic_card",
    "elastic_forward_features", "elastic_forward_features_list", "extract",
]
