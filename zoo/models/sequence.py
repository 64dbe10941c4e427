"""Sequence encoders over precomputed embeddings (LV-MAE's encoder, arXiv:2504.03501).

No patch embedding: the input is a sequence of frozen embeddings (B, T, D), e.g. one per video segment or
image crop, and the width is D itself. A class token and a fixed 1-D sin-cos position embedding (the class
token's row is zero, as MAE's) go in front of zoo `Block`s (attention through `zoo.kernels`) and a final
LayerNorm. Variable lengths are zero-padded with a key-padding mask (True at padding): no token ever attends
to a padding key, so a padded sequence's real tokens and class token come out as the unpadded sequence's.

    model = zoo.create_model("seq_tiny", embed_dim=192)   # width = the embedding dimension
    cls = model(emb, key_padding_mask=pad)                # (B, D): the class token's features
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.models.vit import Block, init_linears
from zoo.registry import MODELS


def sincos_pos_embed_1d(dim: int, length: int, num_prefix: int = 1) -> torch.Tensor:
    """Fixed 1-D sin-cos position embedding (1, prefix + length, dim), MAE's 1-D convention: the first half of
    the channels sin(pos * w_k), the second half cos(pos * w_k), w_k = 10000^(-k / (dim / 2)); prefix rows zero."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos position embedding needs an even embed_dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64).reshape(-1, 1) * omega
    emb = torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), torch.cat([angles.sin(), angles.cos()], 1)])
    return emb.float().unsqueeze(0)


class SequenceTransformer(nn.Module):
    """Transformer over embedding sequences with the zoo feature API (`forward_features`, `forward_head`).

    `embed_dim` must equal the embeddings' dimension; `max_len` is the longest sequence it takes (its
    position table). `forward` returns the class token's features (or `head` logits with `num_classes`)."""

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        max_len: int = 64,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            fits = [h for h in range(1, min(embed_dim, 64) + 1) if embed_dim % h == 0]
            raise ZooError(f"num_heads={num_heads} does not split embed_dim {embed_dim} into equal heads; "
                           f"head counts that fit: {', '.join(map(str, fits))}")
        if max_len < 1:
            raise ZooError(f"max_len must be at least 1, got {max_len}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.embed_dim = self.num_features = embed_dim
        self.max_len = max_len
        self.num_classes = num_classes
        self.num_prefix_tokens = 1
        self.global_pool = "token"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # derived from (embed_dim, max_len): not a weight, so not in the state dict
        self.register_buffer("pos_embed", sincos_pos_embed_1d(embed_dim, max_len), persistent=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i],
                                            norm_layer=norm_layer) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg: dict[str, Any] = {
            "input": "embeddings",  # not images: (B, T, embed_dim) sequences, T <= max_len, + key_padding_mask
            "input_size": (max_len, embed_dim),
            "num_classes": num_classes,
        }
        nn.init.normal_(self.cls_token, std=1e-6)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's convention (the class token is the stem), for layer-wise lr decay."""
        return {"stem": r"^cls_token", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def check_input(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> None:
        """A one-line error for input this encoder cannot take."""
        name = getattr(self, "zoo_arch", type(self).__name__)
        if x.ndim != 3:
            raise ZooError(f"{name} takes embedding sequences (batch, length, {self.embed_dim}), got shape "
                           f"{tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ZooError(f"{name}: the embeddings are {x.shape[-1]}-d but this encoder is {self.embed_dim} wide; "
                           f"build it with embed_dim={x.shape[-1]} (the embedder's width)")
        if x.shape[1] > self.max_len:
            raise ZooError(f"{name}: a sequence of {x.shape[1]} embeddings is longer than max_len={self.max_len}; "
                           f"build it with max_len>={x.shape[1]} or shorten the sequences")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
            raise ZooError(f"{name}: key_padding_mask must be (batch, length) = {tuple(x.shape[:2])}, got "
                           f"{tuple(key_padding_mask.shape)}")

    def seq_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, D) plus their position embedding, no class token (the counterpart of the ViT's
        `patch_tokens`: masked-modelling methods choose which of these tokens the blocks see)."""
        self.check_input(x)
        return x + self.pos_embed[:, 1 : x.shape[1] + 1].to(x.dtype)

    def add_prefix(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Of tokens (B, N, D), only those in `keep` (B, K) if given, with the class token (position row 0) in front."""
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    @staticmethod
    def attention_mask(key_padding_mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """The blocks' bool mask (B, 1, 1, 1 + K), True = attend, from a padding mask (B, N) True at padding
        (gathered to `keep` when given; the class token is never padding); None when nothing is padded."""
        if key_padding_mask is None:
            return None
        pad = key_padding_mask.bool()
        if keep is not None:
            pad = torch.gather(pad, 1, keep)
        if not pad.any():
            return None
        pad = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1)
        return ~pad[:, None, None, :]

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward_features` from tokens that carry their positions (`seq_tokens`): the class token, only the
        tokens `keep` (B, K) if given, blocks under the padding mask (B, N) of all N tokens, final norm."""
        mask = self.attention_mask(key_padding_mask, keep)
        x = self.add_prefix(x, keep)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + T, D), class token first; `key_padding_mask` (B, T) is True
        at padding (those outputs are meaningless; no other token attends to them)."""
        self.check_input(x, key_padding_mask)
        return self.forward_tokens(self.seq_tokens(x), key_padding_mask=key_padding_mask)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The class token's features (B, D) (logits with `num_classes`)."""
        return self.forward_head(self.forward_features(x, key_padding_mask))


# -- registered architectures ---------------------------------------------------------------------
# embed_dim must be the embeddings' width: pass it when it differs (seq_tiny with embed_dim=384 for a ViT-S embedder).
SEQ_ARCHS: dict[str, dict[str, Any]] = {
    "seq_nano": dict(embed_dim=128, depth=2, num_heads=4, max_len=64),
    "seq_tiny": dict(embed_dim=192, depth=6, num_heads=3, max_len=64),
    "seq_small": dict(embed_dim=384, depth=8, num_heads=6, max_len=256),
    "seq_base": dict(embed_dim=768, depth=12, num_heads=12, max_len=256),
    "seq_large": dict(embed_dim=1024, depth=24, num_heads=16, max_len=256),  # LV-MAE's width (README: depth 32)
}


def _seq_factory(defaults: dict[str, Any]):
    def build(**overrides: Any) -> SequenceTransformer:
        return SequenceTransformer(**{**defaults, **overrides})

    return build


for _name, _cfg in SEQ_ARCHS.items():
    MODELS.register(_name, _seq_factory(_cfg), family="sequence", modality="embeddings", defaults=dict(_cfg))

__all__ = ["SequenceTransformer", "sincos_pos_embed_1d", "SEQ_ARCHS"]
