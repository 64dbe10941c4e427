"""Vision Transformer backbones.

A compact ViT whose parameter names are those of timm's `VisionTransformer` (and of the
official MAE/DINO code), so checkpoints move between them by key filtering alone. Attention
goes through `zoo.kernels.attention`; patch tokens can be dropped before the blocks (`keep=`)
or replaced by a caller's mask token (`mask=`, iBOT/DINOv2) for masked-image-modelling methods, and
multi-crop batches of several resolutions run as one packed sequence (`forward_features_list`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_

from zoo.errors import ZooError
from zoo.kernels import attention, attention_varlen, attention_weights
from zoo.registry import MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, num_prefix: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, prefix + h*w, dim), MAE convention:
    first half of the channels encodes the column, second half the row; prefix rows are zero."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    emb = torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def channel_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation for `in_chans` inputs: as given when it has one value per channel; ImageNet's
    3-value default becomes its channel average on each of another number of channels (a grey ViT: 0.449 / 0.226,
    timm's rule); any other mismatch is a one-line error."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == len(std) == in_chans:
        return mean, std
    if mean == IMAGENET_MEAN and std == IMAGENET_STD:
        return (sum(mean) / 3,) * in_chans, (sum(std) / 3,) * in_chans
    raise ZooError(f"mean {list(mean)} and std {list(std)} must have one value per input channel (in_chans={in_chans})")


def init_linears(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT init of every Linear in `module`: weights truncated-normal(std), biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention; the product itself is `zoo.kernels.attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # the logit scale of this block's attention
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of tokens (B, N, C), each (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        seqlens: Sequence[int] | None = None,
        return_qk: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`seqlens`: x is (1, T, C) packed sequences of these lengths, each attending only within itself.
        `return_qk`: also return this forward's (q, k), each (B, heads, N, head_dim); logits = q kᵀ · `scale`."""
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        dropout_p = self.attn_drop if self.training else 0.0
        if seqlens is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask and seqlens cannot be combined")
            x = attention_varlen(q, k, v, seqlens, dropout_p=dropout_p)
        else:
            x = attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        out = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
        return (out, (q, k)) if return_qk else out


def drop_path_packed(x: torch.Tensor, drop_prob: float, seqlens: Sequence[int], scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth on packed sequences (1, T, C): one keep/drop draw per sequence, as an unpacked
    batch draws one per sample (timm's DropPath would drop the whole pack at once)."""
    if drop_prob == 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty(len(seqlens)).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        keep.div_(keep_prob)
    lengths = torch.as_tensor(list(seqlens), device=x.device)
    return x * torch.repeat_interleave(keep, lengths, output_size=x.shape[1]).view(1, -1, 1)


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale and stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Any = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _drop_path(self, module: nn.Module, x: torch.Tensor, seqlens: Sequence[int] | None) -> torch.Tensor:
        if seqlens is None or not isinstance(module, DropPath) or not self.training:
            return module(x)
        return drop_path_packed(x, module.drop_prob, seqlens, module.scale_by_keep)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        seqlens: Sequence[int] | None = None,
        return_qk: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`seqlens`: x is (1, T, C) packed sequences (see `Attention.forward`); norms and MLP run on all tokens.
        `return_qk`: also return the attention's (q, k) of this same forward (see `Attention.forward`)."""
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, seqlens=seqlens, return_qk=return_qk)
        if return_qk:
            attn, qk = attn
        x = x + self._drop_path(self.drop_path1, self.ls1(attn), seqlens)
        x = x + self._drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), seqlens)
        return (x, qk) if return_qk else x

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) of this block's attention for input tokens x, without the rest of the block."""
        q, k, _ = self.attn.qkv_heads(self.norm1(x))
        return q, k


def take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """Block indices to return: None -> all, int n -> the last n, a sequence -> those (negatives from the end)."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices={indices} is out of range 1..{num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
        out.append(j)
    return out


class VisionTransformer(nn.Module):
    """ViT backbone with timm-compatible parameter names and the uniform feature API
    (`forward_features`, `forward_head`, `forward_intermediates`)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: Literal["token", "avg", ""] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: Literal["learn", "sincos"] = "learn",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        last_heads: int | None = None,
        pre_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        """`last_heads`: the last block's head count when it differs from `num_heads` (UNIP's student takes its
        teacher's head count there: ViT-S with 16 heads of 24 channels in its last block). `pre_norm`: a LayerNorm
        `norm_pre` after the position embedding, before the blocks, and no patch-embedding bias (timm's rule; CLIP
        ViTs' `ln_pre`); `norm_eps`: every LayerNorm's eps (open_clip's are 1e-5)."""
        super().__init__()
        for what, heads in (("num_heads", num_heads), ("last_heads", last_heads)):
            if heads is not None and (heads < 1 or embed_dim % heads):
                fits = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0 and h <= 64]
                raise ZooError(f"{what}={heads} does not split embed_dim {embed_dim} into equal heads; "
                               f"head counts that fit: {', '.join(map(str, fits))}")
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.pos_embed_type = pos_embed

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                      strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        n_pos = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim), requires_grad=pos_embed == "learn")
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, last_heads if last_heads and i == depth - 1 else num_heads, mlp_ratio, qkv_bias,
                      init_values, drop_rate, attn_drop_rate, dpr[i], norm_layer)
                for i in range(depth)
            ]
        )
        use_fc_norm = global_pool == "avg"  # timm's rule: avg pooling normalises after pooling
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        mean, std = channel_stats(mean, std, in_chans)
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (in_chans, img_size, img_size),
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "num_classes": num_classes,
        }
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed_type == "sincos":
            grid_h, grid_w = self.patch_embed.grid_size
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid_h, grid_w, self.num_prefix_tokens))
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        init_linears(self)

    # -- helpers ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, timm's convention: stem first, one group per block, the final norm
        last. timm's layer-decay optimizer factory and `Method.param_groups(layer_decay=...)` read it."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed|^norm_pre", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_2d(self.embed_dim, *grid, self.num_prefix_tokens).to(self.pos_embed)
        return resample_abs_pos_embed(
            self.pos_embed, list(grid), list(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens
        )

    def embed(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch tokens + position embedding, then the class token (then `norm_pre`, if any). Optionally only the patches `keep` (B, K)
        (MAE), or with the patches where `mask` (B, N) is True replaced by `mask_token` (D,) or (1, 1, D)
        before the position embedding is added (iBOT/DINOv2); the caller owns the token."""
        if keep is not None and mask is not None:
            raise ValueError("pass keep= (drop patches) or mask= (replace patches), not both")
        return self.add_prefix(self.patch_tokens(x, mask, mask_token), keep)

    def patch_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The first half of `embed`: patch embeddings (B, N, D) plus their position embedding, no prefix tokens
        (`mask`/`mask_token` as in `embed`). MAE-style methods choose which of these tokens the blocks see."""
        _, _, h, w = x.shape
        grid = (h // self.patch_embed.patch_size[0], w // self.patch_embed.patch_size[1])
        x = self.patch_embed(x)
        if mask is not None:
            if mask_token is None:
                raise ValueError("mask= needs mask_token=, the (D,) or (1, 1, D) embedding of a masked patch")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"mask must be (batch, patches) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.bool().unsqueeze(-1), mask_token.reshape(1, 1, -1).to(x.dtype), x)
        return x + self._pos_embed_for(grid)[:, self.num_prefix_tokens :]

    def add_prefix(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The second half of `embed`: of the tokens (B, N, D) from `patch_tokens`, only those in `keep` (B, K) if
        given, with the class token (and its position row) in front, then `norm_pre`."""
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.norm_pre(self.pos_drop(x))

    def forward_tokens(
        self, x: torch.Tensor, keep: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward_features` from tokens (B, N, D) that already carry their positions (`patch_tokens`, or
        tokens a method made itself): prefix, blocks (under `attn_mask`, if any), final norm."""
        return self.norm(self._run_blocks(self.add_prefix(x, keep), attn_mask=attn_mask))

    def _run_blocks(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, seqlens: Sequence[int] | None = None
    ) -> torch.Tensor:
        for blk in self.blocks:
            if getattr(self, "grad_checkpointing", False) and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, attn_mask, seqlens, use_reentrant=False)
            else:
                x = blk(x, attn_mask=attn_mask, seqlens=seqlens)
        return x

    # -- the uniform feature API --------------------------------------------------------------
    def forward_features(
        self,
        x: torch.Tensor,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All tokens after the final norm: (B, prefix + N, D), or prefix + K with `keep`; `mask`/`mask_token`
        replace patch embeddings (see `embed`)."""
        return self.norm(self._run_blocks(self.embed(x, keep, mask, mask_token)))

    def forward_features_list(
        self,
        xs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor | None] | None = None,
        mask_token: torch.Tensor | None = None,
        pack: bool | None = None,
    ) -> list[torch.Tensor]:
        """`forward_features` of each batch in `xs` (multi-crop: resolutions may differ), `masks[i]` for xs[i].

        `pack=True` runs every token sequence of every batch as one packed (1, T, D) sequence with
        block-diagonal attention (one launch per layer); False runs each batch on its own; None packs on
        CUDA only (on the CPU packed attention is per-length dense calls anyway). Results are the same."""
        xs = list(xs)
        masks = [None] * len(xs) if masks is None else list(masks)
        if len(masks) != len(xs):
            raise ValueError(f"got {len(masks)} masks for {len(xs)} inputs; pass one per input (None: unmasked)")
        if not xs:
            return []
        if pack is None:
            pack = xs[0].is_cuda
        if not pack:
            return [self.forward_features(x, mask=m, mask_token=mask_token) for x, m in zip(xs, masks)]
        tokens = [self.embed(x, mask=m, mask_token=mask_token) for x, m in zip(xs, masks)]
        seqlens = [t.shape[1] for t in tokens for _ in range(t.shape[0])]
        packed = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)
        out = self.norm(self._run_blocks(packed, seqlens=seqlens))
        pieces = out[0].split([t.shape[0] * t.shape[1] for t in tokens])
        return [p.reshape(t.shape[0], t.shape[1], -1) for p, t in zip(pieces, tokens)]

    # -- attention hooks: what a block attends to, from the forward itself -----------------------
    def forward_qk(
        self, x: torch.Tensor, layers: int | Sequence[int] | None = None, keep: torch.Tensor | None = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{block index: (q, k)}, each (B, heads, prefix + N, head_dim), of the blocks in `layers` (0-based,
        negatives from the end; None: all). One forward that stops at the deepest one's attention: its output
        and MLP, the blocks after it and the final norm are not run (UNIP's teacher and student). Logits of
        block i are q kᵀ · `self.blocks[i].attn.scale`, each block with its own head count and scale."""
        take = self.layer_indices(layers)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        x = self.embed(x, keep)
        for i, blk in enumerate(self.blocks[: take[-1] + 1]):
            if i == take[-1]:
                out[i] = blk.qk(x)
            elif i in take:
                x, out[i] = blk(x, return_qk=True)
            elif getattr(self, "grad_checkpointing", False) and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return out

    def attention_logits(self, x: torch.Tensor, layers: int | Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """{block index: pre-softmax attention logits (B, heads, prefix + N, prefix + N)} (see `forward_qk`)."""
        return {i: (q @ k.transpose(-2, -1)) * self.blocks[i].attn.scale for i, (q, k) in self.forward_qk(x, layers).items()}

    def attention_maps(self, x: torch.Tensor, layers: int | Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """{block index: post-softmax attention (B, heads, prefix + N, prefix + N)}, rows summing to 1."""
        return {i: attention_weights(q, k, scale=self.blocks[i].attn.scale) for i, (q, k) in self.forward_qk(x, layers).items()}

    def layer_indices(self, layers: int | Sequence[int] | None) -> list[int]:
        """Sorted unique 0-based block indices of `layers` (an index, several, negatives from the end, None:
        all); a one-line error naming the valid range for one that does not exist."""
        depth = len(self.blocks)
        wanted = None if layers is None else [layers] if isinstance(layers, int) else list(layers)
        if wanted is not None and not wanted:
            raise ZooError(f"no layers given: pass 0-based block indices 0..{depth - 1}, or None for all")
        try:
            return sorted(set(take_indices(depth, wanted)))
        except (ValueError, TypeError):
            raise ZooError(f"layers {layers!r} do not exist in this {depth}-block ViT (out of range): use 0..{depth - 1} "
                           f"(0-based; -{depth}..-1 from the end)") from None

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Post-softmax attention of the last block (B, heads, prefix + N, prefix + N), as DINO's
        visualize_attention draws it (row 0, the class token's, over the patches)."""
        return self.attention_maps(x, -1)[len(self.blocks) - 1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens from `forward_features` and apply the head (if any)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ):
        """Outputs of chosen blocks (timm semantics): spatial maps (NCHW) or token lists (NLC),
        with the final normalised tokens unless `intermediates_only`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = take_indices(len(self.blocks), indices)
        b, _, h, w = x.shape
        grid = (h // self.patch_embed.patch_size[0], w // self.patch_embed.patch_size[1])
        x = self.embed(x)
        blocks = self.blocks[: max(take) + 1] if stop_early or intermediates_only else self.blocks
        feats = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        prefix = [f[:, : self.num_prefix_tokens] for f in feats]
        feats = [f[:, self.num_prefix_tokens :] for f in feats]
        if output_fmt == "NCHW":
            feats = [f.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if return_prefix_tokens and self.num_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self.norm(x), feats


# -- registered architectures: data, not code -------------------------------------------------
# CPU-scale ViTs (patch 4 on 32 px, patch 8 on 64 px) for work on built-in data, then the
# standard shapes under timm's names.
VIT_ARCHS: dict[str, dict[str, Any]] = {
    "vit_nano_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=8, num_heads=6),
    "vit_tiny_patch8_64": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vit_small_patch8_64": dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),  # DINO's ViT-S/8
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    # DINOv2's (without registers): 518 px, patch 14, LayerScale
    "vit_small_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5),
    "vit_base_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
    "vit_large_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                     init_values=1e-5),
}


def _vit_factory(defaults: dict[str, Any]):
    def build(**overrides: Any) -> VisionTransformer:
        return VisionTransformer(**{**defaults, **overrides})

    return build


for _name, _cfg in VIT_ARCHS.items():
    MODELS.register(_name, _vit_factory(_cfg), family="vit", defaults=dict(_cfg))


def vit_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """The zoo `VisionTransformer` arguments that build a model of `model`'s shape and settings."""
    c, h, _ = model.pretrained_cfg["input_size"]
    blk = model.blocks[0]
    return dict(
        img_size=h,
        patch_size=model.patch_embed.patch_size[0],
        in_chans=c,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None,
        init_values=blk.ls1.init_values if isinstance(blk.ls1, LayerScale) else None,
        class_token=model.cls_token is not None,
        pos_embed=model.pos_embed_type,
        drop_rate=model.pos_drop.p,
        attn_drop_rate=blk.attn.attn_drop,
        drop_path_rate=max(getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks),
        mean=tuple(model.pretrained_cfg["mean"]),
        std=tuple(model.pretrained_cfg["std"]),
        last_heads=last_heads(model),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        norm_eps=blk.norm1.eps,
    )


def last_heads(model: VisionTransformer) -> int | None:
    """The last block's head count where it differs from the others' (UNIP students), else None."""
    heads = model.blocks[-1].attn.num_heads
    return heads if heads != model.blocks[0].attn.num_heads else None


def timm_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """Constructor arguments of timm's `VisionTransformer` with the same parameters and forward."""
    if last_heads(model) is not None:
        raise ZooError(f"this ViT's last block has {last_heads(model)} heads and the others "
                       f"{model.blocks[0].attn.num_heads}: timm's VisionTransformer has one head count, so it would load "
                       "these weights with a different forward; use the zoo model")
    zoo_only = ("pos_embed", "drop_rate", "attn_drop_rate", "drop_path_rate", "mean", "std", "last_heads", "norm_eps")
    args = {k: v for k, v in vit_kwargs(model).items() if k not in zoo_only}
    return {**args, "norm_layer": partial(nn.LayerNorm, eps=model.blocks[0].norm1.eps)}


__all__ = ["VisionTransformer", "Block", "Attention", "drop_path_packed", "sincos_pos_embed_2d", "VIT_ARCHS", "timm_kwargs",
           "vit_kwargs", "last_heads"]
