"""MAE: masked autoencoders (He et al., 2021, arXiv:2111.06377), as in facebookresearch/mae `models_mae.py`.

A ViT encoder sees only a random 25% of the patches (plus the class token); a light decoder
gets the encoded patches back in place, a shared mask token everywhere else, and predicts the
pixels of every patch; the loss is the MSE on the removed patches only, against per-patch
normalised pixels (`norm_pix_loss`). Read it beside the paper: the pure pieces come first
(`patchify`, `unpatchify`, `random_masking`, `mae_loss`), then `MAEDecoder`, then the `MAE` method.

Registered as `RECIPES["mae"]`, whose factory is the `MAE` class itself: the recipe's method
arguments are `MAE`'s constructor arguments (`RECIPES.build("mae", arch="vit_tiny_patch4_32")`).

The variants (SatMAE++ `satmae.py`, BM-MAE `bmmae.py`, MP3 `mp3.py`, self-distillation `mae_distill.py`,
LV-MAE `lvmae.py`, medical MAE `medical_mae.py`) subclass
`MAE` and override only the hooks that differ (specs/mae.md §2), in the order the step calls them:
`inputs` (batch -> what is masked) -> `tokenize` (-> tokens with positions, grid) -> `sample_mask` ->
`encode` (kept tokens) -> `decode` (every token) vs `targets`, scored by `reconstruction_loss`, plus
`extra_losses` weighted by `loss_weights`; `build_decoder` makes the decoder (or none).

Naming: inside the method the encoder is `encoder.*` and the decoder `decoder.*`; the official
`models_mae` key names (top-level `cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`,
`norm.*`, `decoder_embed.*`, `mask_token`, `decoder_*`) are one rename away, both ways:
`MAE.official_state_dict()` / `MAE.load_official_state_dict()` (see `to_official_keys`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from einops import rearrange

import zoo
from zoo.errors import ConfigError
from zoo.models.vit import Block, sincos_pos_embed_2d
from zoo.recipes.base import DataSpec, Method, check_vit_overrides
from zoo.registry import MODELS, RECIPES

NORM_PIX_EPS = 1e-6
DECODER_KEY_PREFIXES = ("decoder_", "mask_token")  # models_mae keys that belong to the decoder


# -- pure pieces -------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels in a patch ordered
    (row, col, channel) with the channel last, as MAE's targets and `decoder_pred` outputs."""
    h, w = imgs.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    return rearrange(imgs, "b c (i p) (j q) -> b (i j) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, C: int = 3, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, H, W). The grid is square unless given as (rows, cols)."""
    _, n, d = x.shape
    if d != p * p * C:
        raise ValueError(f"patch vectors have {d} values, expected p*p*C = {p * p * C}")
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {gh}x{gw} does not hold {n} patches")
    return rearrange(x, "b (i j) (p q c) -> b c (i p) (j q)", i=gh, j=gw, p=p, q=p, c=C)


def random_masking(
    B: int,
    N: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample uniform masking: argsort of uniform noise, the K = int(N*(1-ratio)) smallest kept.

    Returns `ids_keep` (B, K): kept patch indices in shuffled order; `ids_restore` (B, N): the
    inverse permutation (gather(shuffled, ids_restore) restores the original order); `mask`
    (B, N) float: 0 = kept, 1 = removed, in the original patch order. One `torch.rand(B, N)`
    is the only random draw, so a seeded generator (on `device`) makes it reproducible.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def norm_pix_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and unbiased variance over the last dimension (MAE's norm-pix statistics)."""
    return target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)


def mae_loss(pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error per patch, averaged over the removed patches only (sum(loss*mask)/sum(mask)).

    With `norm_pix`, each target patch is standardised by its own mean and unbiased variance,
    (t - mean) / sqrt(var + 1e-6). Computed in float32 whatever the autocast dtype of `pred`.
    """
    target = target_patches.float()
    if norm_pix:
        mean, var = norm_pix_stats(target)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def to_official_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`MAE.state_dict()` keys (`encoder.*`, `decoder.*`) -> facebookresearch/mae `models_mae` keys."""
    out = {}
    for k, v in sd.items():
        for prefix in ("encoder.", "decoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


def from_official_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/mae `models_mae` keys -> `MAE.state_dict()` keys (inverse of `to_official_keys`)."""
    return {(f"decoder.{k}" if k.startswith(DECODER_KEY_PREFIXES) else f"encoder.{k}"): v for k, v in sd.items()}


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init for one module: Linear xavier_uniform (a fused qkv as one matrix) and zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@dataclass
class MaskedOutput:
    """One masked forward: `latent` (B, 1 + K, D) the encoded kept tokens, `pred` the decoder's output for every
    token, `mask` (B, N) 1 = removed, `ids_restore` (B, N), `grid` the token grid (rows, cols)."""

    latent: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    grid: tuple[int, int]


# -- decoder -----------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """The MAE decoder: encoded visible tokens + mask tokens, back in patch order -> pixels per patch.

    Parameter names are those of `models_mae.MaskedAutoencoderViT` (`decoder_embed`, `mask_token`,
    `decoder_pos_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred`).
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        embed_dim: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        patch_size: int = 16,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.decoder_dim = decoder_dim
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_dim, *self.grid_size), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.decoder_pos_embed
        return sincos_pos_embed_2d(self.decoder_dim, *grid).to(self.decoder_pos_embed)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """latent (B, 1 + K, D) with the class token first, ids_restore (B, N) -> pred (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        visible = x[:, 1:]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)  # shuffled order: kept first, then removed
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self._pos_embed_for(grid or self.grid_size)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]


# -- the method --------------------------------------------------------------------------------
class MAE(Method):
    """MAE pretraining of a zoo ViT (`arch`), exported as that ViT under the recipe's tag.

    The encoder is `zoo.create_model(arch, pos_embed="sincos", global_pool="token", num_classes=0,
    **arch_overrides)` re-initialised with MAE's init; the decoder defaults to the paper's
    512-d, 8 blocks, 16 heads ("dec512d8b"); the small ViTs want a smaller one (e.g. 128/2/4).
    """

    recipe = "mae"  # the registered name, in error messages (each variant sets its own)

    def __init__(
        self,
        arch: str,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        **arch_overrides: Any,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"{self.recipe}: mask_ratio must be in (0, 1), got {mask_ratio}")
        if MODELS.get(arch).meta.get("family") != "vit":
            raise ConfigError(f"{self.recipe}: {arch!r} is not a ViT architecture; MAE masks the patch tokens of a zoo ViT")
        check_vit_overrides(type(self), self.recipe, arch_overrides)
        for key, need in (("global_pool", "token"), ("num_classes", 0), ("class_token", True)):
            if key in arch_overrides and arch_overrides[key] != need:
                raise ConfigError(
                    f"{self.recipe}: the pretraining encoder needs {key}={need!r} (class token, final norm, no head); "
                    f"got {arch_overrides[key]!r}. Choose pooling and heads when fine-tuning or probing"
                )
        args = {"pos_embed": "sincos", "global_pool": "token", "num_classes": 0, **arch_overrides}
        encoder = zoo.create_model(arch, **args)
        self.arch = arch
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.encoder = encoder
        self.decoder = self.build_decoder(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio)
        self.loss_weights: dict[str, float] = {"rec": 1.0}  # a variant weighs its extra terms here
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init, encoder included (it replaces the ViT's own): xavier Linear, LN 1/0, patch conv
        weight xavier on its (D, C*p*p) view (bias keeps Conv2d's default), cls/mask token N(0, 0.02).
        Fixed sin-cos position embeddings were set when the modules were built."""
        self.apply(init_mae_weights)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        if isinstance(getattr(self.decoder, "mask_token", None), nn.Parameter):
            nn.init.normal_(self.decoder.mask_token, std=0.02)

    def build_decoder(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module | None:
        """The module `decode` runs (MAE's pixel decoder; a variant's own, or None for a variant without one)."""
        return MAEDecoder(self.encoder.patch_embed.grid_size, self.encoder.embed_dim, decoder_dim=dim, depth=depth,
                          num_heads=heads, patch_size=self.patch_size, in_chans=self.in_chans, mlp_ratio=mlp_ratio)

    # -- the hooks a variant overrides (specs/mae.md §2) ------------------------------------------
    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the step masks and reconstructs, from the batch: the image."""
        return batch["image"]

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Input -> (patch tokens (B, N, D) with their position embedding, grid (rows, cols))."""
        return self.encoder.patch_tokens(x), self._grid(x)

    def sample_mask(
        self, B: int, N: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_keep (B, K), ids_restore (B, N), mask (B, N), 1 = removed): MAE's uniform random masking."""
        return random_masking(B, N, ratio, generator=generator, device=device)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The kept tokens, class token in front, through the blocks and the final norm: (B, 1 + K, D)."""
        return self.encoder.forward_tokens(tokens, keep=ids_keep)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoded visible tokens -> a prediction for every patch (B, N, p*p*C)."""
        return self.decoder(latent, ids_restore, grid)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """What `decode` predicts, per patch: the input's pixels, patchified (B, N, p*p*C)."""
        return patchify(x, self.patch_size)

    def reconstruction_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on the removed patches (norm-pix targets with `norm_pix_loss`)."""
        return mae_loss(pred, target, mask, self.norm_pix_loss)

    def extra_losses(self, batch: dict[str, Any], x: torch.Tensor, out: MaskedOutput) -> dict[str, torch.Tensor]:
        """Further loss terms by name (multi-scale L1, distillation), weighted by `loss_weights[name]` (default 1)."""
        return {}

    # -- models_mae's forward, through the hooks --------------------------------------------------
    def _grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def forward_masked(
        self, x: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> MaskedOutput:
        """tokenize -> sample_mask -> encode the kept tokens -> decode every token."""
        tokens, grid = self.tokenize(x)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, ids_restore, mask = self.sample_mask(tokens.shape[0], tokens.shape[1], ratio, tokens.device, generator)
        latent = self.encode(tokens, ids_keep)
        pred = self.decode(latent, ids_restore, grid)
        return MaskedOutput(latent, pred, mask, ids_restore, grid)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode a random subset of the patches: (latent (B, 1 + K, D), mask (B, N), ids_restore (B, N))."""
        tokens, _ = self.tokenize(imgs)
        ids_keep, ids_restore, mask = self.sample_mask(tokens.shape[0], tokens.shape[1], mask_ratio, tokens.device, generator)
        return self.encode(tokens, ids_keep), mask, ids_restore

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (B, N, p*p*C), mask (B, N), 1 = removed), as `MaskedAutoencoderViT.forward`."""
        out = self.forward_masked(imgs, mask_ratio, generator)
        return self.reconstruction_loss(out.pred, self.targets(imgs), out.mask), out.pred, out.mask

    # -- the Method contract ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """loss = loss_weights["rec"] * reconstruction + the weighted `extra_losses`; each term is logged."""
        x = self.inputs(batch)
        out = self.forward_masked(x)
        terms = {"rec": self.reconstruction_loss(out.pred, self.targets(x), out.mask), **self.extra_losses(batch, x, out)}
        loss = sum(self.loss_weights.get(name, 1.0) * value for name, value in terms.items())
        logged = {f"loss_{name}": value.detach() for name, value in terms.items()} if len(terms) > 1 else {}
        return {"loss": loss, **logged, "mask_ratio": torch.tensor(self.mask_ratio)}

    def data_spec(self) -> DataSpec:
        # The paper's only augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip.
        return DataSpec(fields=("image",), train_transform={"scale": (0.2, 1.0), "hflip": 0.5, "interpolation": "bicubic"})

    # param_groups: the base class already applies MAE's rule (timm add_weight_decay without a skip
    # list): no decay for 1-D params and biases, cls_token and mask_token (3-D) decayed, and the
    # frozen sin-cos position embeddings (requires_grad=False) left out.

    def backbone(self) -> nn.Module:
        """The encoder, a plain zoo ViT: what is published (`zoo.load` rebuilds it from its card)."""
        return self.encoder

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/reconstruction.png: original, masked, reconstruction and pasted rows of 8 images."""
        from zoo.engine.plots import image_grid

        images = batch["image"][:8]
        rec = self.reconstruct(images, generator=torch.Generator(device=images.device).manual_seed(0))
        cfg = self.encoder.pretrained_cfg
        names = ("original", "masked", "reconstruction", "pasted")
        return [image_grid([rec[k] for k in names], folder / "reconstruction.png", mean=cfg["mean"], std=cfg["std"],
                           row_labels=names)]

    # -- official checkpoints --------------------------------------------------------------------
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's state dict under `models_mae` key names: `{'model': this}` is an official-style
        checkpoint that `zoo.load(path, arch=...)` and `MaskedAutoencoderViT.load_state_dict` accept."""
        return to_official_keys(self.state_dict())

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True):
        """Load a `models_mae` state dict (e.g. a `*_full.pth` or visualize checkpoint's 'model')."""
        return self.load_state_dict(from_official_keys(sd), strict=strict)

    # -- visualisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images (B, C, H, W, in the input's normalised space) for a reconstruction grid:
        `original`, `masked` (removed patches zeroed), `reconstruction` (predicted pixels of every
        patch; with norm-pix, de-normalised with each target patch's own mean/var as the MAE demo
        does), `pasted` (visible patches + reconstruction of the removed ones) and `mask` (B, 1, H, W)."""
        _, pred, mask = self(imgs, generator=generator)
        pred = pred.float()
        if self.norm_pix_loss:
            mean, var = norm_pix_stats(patchify(imgs.float(), self.patch_size))
            pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
        grid = self._grid(imgs)
        p, c = self.patch_size, self.in_chans
        recon = unpatchify(pred, p, c, grid)
        mask_img = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c).float(), p, c, grid)
        original = imgs.float()
        return {
            "original": original,
            "masked": original * (1 - mask_img),
            "reconstruction": recon,
            "pasted": original * (1 - mask_img) + recon * mask_img,
            "mask": mask_img[:, :1],
        }


RECIPES.register(
    "mae",
    MAE,
    family="mae",
    paper="arXiv:2111.06377",
    cpu_recipe="mae_vit_tiny_patch4_32_fractals",
    description="Masked autoencoder: ViT encoder on 25% of the patches, light decoder predicts the pixels of the rest",
)

__all__ = [
    "MAE",
    "MaskedOutput",
    "MAEDecoder",
    "patchify",
    "unpatchify",
    "random_masking",
    "mae_loss",
    "norm_pix_stats",
    "init_mae_weights",
    "to_official_keys",
    "from_official_keys",
]
