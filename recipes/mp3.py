"""MP3: masked patch position prediction (Zhai et al., 2022, arXiv:2207.07611), on the MAE core.

A ViT with NO position embedding learns to say where each of its patches sits: a LayerNorm + Linear head
maps every patch token to logits over the N raster positions of the grid, trained with cross-entropy
against the token's own raster index. Without a position signal the encoder is permutation-equivariant,
so the only way to a position is the content, and the task is made harder by hiding most of it: per
sample a random context of K = int(N * (1 - eta)) patches (eta = `mask_ratio`, 0.75 by default, the
unofficial CIFAR-100 run's value; the paper uses 0.5-0.75) is drawn by MAE's `random_masking`, and in
EVERY attention layer all N patch tokens (and the class token) are queries while keys and values come
only from the context tokens (and the class token) ("masking of keys"; specs/mae.md §3(d)).

What differs from `MAE` (recipes/mae.py), hook by hook:
- the encoder's `pos_embed` is all zeros and frozen (requires_grad False), class-token row included, so
  `tokenize` adds nothing and the exported plain zoo ViT computes exactly what the method's encoder did;
- `encode` runs every patch token under a per-sample boolean key mask (`context_attn_mask`, True = may
  attend, zoo.kernels' convention) through `encoder.forward_tokens(tokens, attn_mask=...)`;
- `build_decoder` returns the position head (`PositionHead`): there is no pixel decoder, `decode` gives
  position logits (B, N, N) in raster order, `targets` are the raster indices 0..N-1, and
  `reconstruction_loss` is `position_loss` (cross-entropy, averaged over the tokens that predict);
- the step logs `pos_acc` (top-1 position accuracy of the predicting tokens); `position_accuracy(method,
  images, mask_ratio)` measures it for a benchmark (eval mode, no grad; mask_ratio 0: the full context).

Choices the sources leave open (the paper's code was not available; see specs/mae.md §3(d), §4):
- K/V are the PER-LAYER hidden states of the context tokens (the spec's reading of the paper): the key mask
  is applied in every block. lucidrains/vit-pytorch `mp3.py` instead reuses the layer-0 context embeddings
  as K/V in every layer; that is not what this recipe does.
- `query_all` is the "masked-token context" switch. True (the paper): the masked (non-context) tokens are
  encoded too, as queries only, and all N patches predict their positions. False: only the context tokens
  are encoded (MAE-style token dropping, ~(1 - eta) of the cost) and only they predict; the others take no
  part at all.
- eta = 0 (`mask_ratio: 0`) is allowed: the full context, no mask (a plain ViT forward).
- The class token is kept (zero position row, as MAE's), is a query and always a key, predicts no
  position, and is the exported feature that kNN / linear probes read.
- The exported ViT has `pos_embed="learn"` type with zero values: probes see no position signal, exactly as
  pretrained; fine-tuning re-adds position embeddings by learning them from zero (the paper's fine-tune PE
  init is unverified).
- Init: MAE's (xavier Linear, LN 1/0, cls N(0, 0.02)); the head is LN + xavier Linear with zero bias.
- Data as MAE's: RandomResizedCrop(0.2-1) + flip. A crop or flip changes the content, not the labels: a
  position is that of the crop's patch in the crop's raster order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError, ZooError
from zoo.recipes.base import check_vit_overrides
from zoo.recipes.mae import MAE, init_mae_weights, patchify, unpatchify
from zoo.registry import RECIPES


# -- pure pieces -------------------------------------------------------------------------------
def context_attn_mask(ids_keep: torch.Tensor, num_patches: int, num_prefix: int = 1) -> torch.Tensor:
    """Boolean attention mask (B, 1, P + N, P + N), True = may attend: every query (prefix and patch
    tokens) attends to the prefix tokens and to the context patches `ids_keep` (B, K) only."""
    b = ids_keep.shape[0]
    keys = torch.zeros(b, num_prefix + num_patches, dtype=torch.bool, device=ids_keep.device)
    keys[:, :num_prefix] = True
    keys.scatter_(1, ids_keep + num_prefix, True)
    n = num_prefix + num_patches
    return keys[:, None, None, :].expand(b, 1, n, n)


def position_loss(logits: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of position logits (B, M, N) against each token's position (B, M), averaged over
    the tokens with weight 1 (`weight` (B, M), 1 = this token predicts; None: all). Float32 whatever
    the autocast dtype."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), positions.flatten(), reduction="none").view(positions.shape)
    if weight is None:
        return ce.mean()
    weight = weight.to(ce.dtype)
    return (ce * weight).sum() / weight.sum()


def position_top1(logits: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 position accuracy: the fraction of predicting tokens (`weight` 1; None: all) whose
    highest logit is their own position."""
    hit = (logits.argmax(dim=-1) == positions).float()
    if weight is None:
        return hit.mean()
    weight = weight.to(hit.dtype)
    return (hit * weight).sum() / weight.sum()


class PositionHead(nn.Module):
    """MP3's head: LayerNorm + Linear(D -> N), position logits for each patch token."""

    def __init__(self, dim: int, num_positions: int):
        super().__init__()
        self.num_positions = num_positions
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_positions)
        self.apply(init_mae_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, M, D) -> logits (B, M, N)."""
        return self.fc(self.norm(tokens))


# -- the method --------------------------------------------------------------------------------
class MP3(MAE):
    """MP3 pretraining of a zoo ViT (`arch`) without position embedding, exported as that ViT.

    `mask_ratio` is eta, the share of patches that are not context (keys); `query_all` (default True):
    every patch is a query and predicts its position; False: only the context is encoded and predicts.
    Other keyword arguments are the ViT's (except `pos_embed`: MP3's encoder has none).
    """

    recipe = "mp3"

    def __init__(self, arch: str, mask_ratio: float = 0.75, query_all: bool = True, **arch_overrides: Any):
        if "pos_embed" in arch_overrides:
            raise ConfigError(f"mp3: the encoder has no position embedding (zeros, frozen, by design); "
                              f"remove pos_embed={arch_overrides['pos_embed']!r}")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mp3: mask_ratio (eta, the share of patches that are not keys) must be in [0, 1), "
                              f"got {mask_ratio!r}; the paper uses 0.5-0.75")
        if not isinstance(query_all, bool):
            raise ConfigError(f"mp3: query_all must be true (every patch predicts) or false (only the context), "
                              f"got {query_all!r}")
        check_vit_overrides(type(self), self.recipe, arch_overrides)  # before MAE's own args (decoder_*) can take them
        # MAE refuses eta = 0 (nothing to reconstruct); MP3's eta = 0 is the full context, so set it after.
        super().__init__(arch, mask_ratio=0.5, norm_pix_loss=False, pos_embed="learn", **arch_overrides)
        self.mask_ratio = float(mask_ratio)
        self.query_all = query_all
        with torch.no_grad():
            self.encoder.pos_embed.zero_()
        self.encoder.pos_embed.requires_grad_(False)

    def build_decoder(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
        """No pixel decoder: the position head over the backbone's N patch positions (the decoder_* sizes are unused)."""
        return PositionHead(self.encoder.embed_dim, self.encoder.patch_embed.num_patches)

    # -- hooks ---------------------------------------------------------------------------------
    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (their position embedding is zero), after checking the grid is the head's."""
        grid = self._grid(x)
        if grid[0] * grid[1] != self.decoder.num_positions:
            gh, gw = self.encoder.patch_embed.grid_size
            raise ZooError(f"mp3: the position head predicts {self.decoder.num_positions} positions ({gh}x{gw} patches "
                           f"of {self.patch_size} px); got {tuple(x.shape[-2:])} images ({grid[0]}x{grid[1]} patches): "
                           f"resize them to {gh * self.patch_size}x{gw * self.patch_size}")
        return super().tokenize(x)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """query_all: every token through the blocks, attending only to the class token and the context
        `ids_keep` (B, 1 + N, D, raster order); else the context tokens alone (B, 1 + K, D, MAE's order)."""
        n = tokens.shape[1]
        if not self.query_all:
            return self.encoder.forward_tokens(tokens, keep=ids_keep)
        if ids_keep.shape[1] == n:  # the full context: no mask at all
            return self.encoder.forward_tokens(tokens)
        return self.encoder.forward_tokens(tokens, attn_mask=context_attn_mask(ids_keep, n, self.encoder.num_prefix_tokens))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Position logits (B, N, N) in raster order; without query_all the rows of non-context tokens are 0
        (they predict nothing: `predicting` gives them weight 0)."""
        logits = self.decoder(latent[:, self.encoder.num_prefix_tokens :])
        b, n = ids_restore.shape
        if logits.shape[1] == n:
            return logits
        pad = logits.new_zeros(b, n - logits.shape[1], logits.shape[-1])
        shuffled = torch.cat([logits, pad], dim=1)  # context first (ids_keep order), then the rest
        return torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Each patch's raster index (B, N): what its logits must point at."""
        gh, gw = self._grid(x)
        return torch.arange(gh * gw, device=x.device).expand(x.shape[0], -1)

    def predicting(self, mask: torch.Tensor) -> torch.Tensor:
        """Which tokens predict their position (B, N), 1 = yes: all with query_all, else the context (mask 0)."""
        return torch.ones_like(mask) if self.query_all else 1.0 - mask

    def reconstruction_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Position cross-entropy, averaged over the predicting tokens."""
        return position_loss(pred, target, self.predicting(mask))

    # -- the Method contract -------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """loss = position cross-entropy; logs pos_acc (top-1 position accuracy) and the mask ratio."""
        x = self.inputs(batch)
        out = self.forward_masked(x)
        target = self.targets(x)
        loss = self.reconstruction_loss(out.pred, target, out.mask)
        acc = position_top1(out.pred.detach(), target, self.predicting(out.mask))
        return {"loss": loss, "pos_acc": acc, "mask_ratio": torch.tensor(self.mask_ratio)}

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/positions.png: original, context (non-context patches blanked) and every predicting patch
        pasted where the model says it belongs (blank: no patch chose that place), 8 images."""
        from zoo.engine.plots import image_grid

        images = batch["image"][:8]
        out = self.forward_masked(images, generator=torch.Generator(device=images.device).manual_seed(0))
        p, c, grid = self.patch_size, self.in_chans, out.grid
        patches = patchify(images.float(), p)
        n = patches.shape[1]
        where = torch.where(self.predicting(out.mask).bool(), out.pred.argmax(-1), n)  # n: a discard slot
        placed = patches.new_zeros(patches.shape[0], n + 1, patches.shape[-1])
        placed.scatter_(1, where.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), patches)
        keep = unpatchify((1 - out.mask).unsqueeze(-1).expand(-1, -1, p * p * c).float(), p, c, grid)
        cfg = self.encoder.pretrained_cfg
        rows = [images.float(), images.float() * keep, unpatchify(placed[:, :n], p, c, grid)]
        return [image_grid(rows, folder / "positions.png", mean=cfg["mean"], std=cfg["std"],
                           row_labels=("original", "context", "placed"))]

    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise ZooError("mp3 predicts positions, not pixels: there is nothing to reconstruct; see draw() or position_accuracy()")


@torch.no_grad()
def position_accuracy(method: MP3, images: torch.Tensor, mask_ratio: float | None = None,
                      generator: torch.Generator | None = None) -> float:
    """Top-1 position accuracy of `method` on `images` (B, C, H, W, normalised) with a random context of
    ratio `mask_ratio` (None: the method's; 0: the full context), in eval mode without gradients."""
    if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
        raise ZooError(f"mask_ratio must be in [0, 1) (0: the full context), got {mask_ratio}")
    was_training = method.training
    method.eval()
    try:
        out = method.forward_masked(images, mask_ratio, generator)
        return float(position_top1(out.pred, method.targets(images), method.predicting(out.mask)))
    finally:
        method.train(was_training)


RECIPES.register(
    "mp3",
    MP3,
    family="mae",
    paper="arXiv:2207.07611",
    cpu_recipe="mp3_vit_tiny_patch4_32_fractals",
    description="Position prediction: a ViT without position embedding predicts each patch's position, "
                "attending only to a random 25% context of keys",
)

__all__ = ["MP3", "PositionHead", "context_attn_mask", "position_loss", "position_top1", "position_accuracy"]
