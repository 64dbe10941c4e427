"""BM-MAE: a multimodal MAE that works with any subset of its modalities (Robinet et al., 2025, arXiv:2505.00568),
brought from 3-D MRI (t1, t1ce, t2, flair) to 2-D images with several renderings of one scene (facts:
specs/mae.md §3(c), read from the perkyfever/BM-MAE fork; the masking is MultiMAE's).

What differs from MAE (`recipes/mae.py`), hook by hook:

- `inputs` / `tokenize`: the sample is a dict of modalities (default the built-in scenes' `image` RGB, `thermal`
  and `depth` grey renderings). Each modality has its OWN patch embedding (a timm PatchEmbed with that modality's
  channels); the ViT's own `patch_embed` is the first one's (`image` when listed), the others live in
  `patch_embeds`. Every modality block gets the same fixed 2-D sin-cos position embedding, and NO modality
  embedding: in the encoder a token's modality shows only through its projection (as BM-MAE). The present
  modalities' tokens are concatenated in the order of `modalities`; one class token goes in front, through ONE
  shared stack of blocks and final norm (the zoo ViT's).
- `sample_mask`: MultiMAE's masking across modalities (`dirichlet_masking`, a pure function): a visible total
  K = int(M * L * (1 - mask_ratio)) per sample, split over the modalities by Dirichlet(alpha = 1) shares, the
  random tokens kept within each modality; the global `ids_restore` is the argsort of argsort(mask + noise).
- Modality dropout (training only, `modality_dropout` = p per modality per sample, `modality_dropout_mask`): a
  dropped modality gets no visible token (its Dirichlet share is 0), its whole budget goes to the others, and it
  is still reconstructed, so the model learns to fill in a missing modality.
- `decode`: MAE's decoder (decoder_embed, mask token, unshuffle) plus a LEARNED modality embedding (trunc-normal
  0.02) added with the 2-D sin-cos of each modality block; shared blocks; one prediction head per modality
  (p*p*C_m values).
- Loss: masked MSE per modality (mean over that modality's removed patches), SUMMED over modalities
  (`modality_losses`); each term is logged as `loss_<modality>`. Norm-pix off by default, as BM-MAE.
- Any subset at evaluation: `features({modality: x, ...})` (unmasked, any non-empty subset) gives the class token;
  `export` publishes one plain zoo ViT per modality: the recipe's name holds the first modality's (`image`) encoder,
  and `ARCH.TAG_<modality>` each other one (in_chans C_m, its own patch embedding, the shared blocks), so
  `zoo.load` + `zoo.eval` work on one modality alone. zoo's evals read a sample's `image` field (a 1-channel model
  gets it as grey); `modality_shards` writes shards whose `image` IS a modality's rendering, to evaluate e.g. the
  thermal encoder on the thermal scenes (as benchmarks/unip_thermal.py does with the dense eval's image_field).

Facts kept from the paper's code: Dirichlet(1) shares with rejection when a share exceeds a modality's tokens; the
decoder 384-d, 3 blocks, 12 heads (the class's defaults); encoder MLP ratio 2 (the paper-scale YAML); norm-pix off;
no modality embedding in the encoder, a learned one in the decoder; loss summed over modalities.

Choices the spec leaves open (or that change with 2-D):
- Exact budget: shares * K are rounded by largest remainders, so every sample keeps exactly K tokens. A draw whose
  share exceeds a modality's free tokens is redrawn (BM-MAE's rejection), up to `MAX_REDRAWS` times; rows still
  over after that (only when the budget nearly fills the free tokens) are clipped and the excess given to the
  modalities with room, so the function always ends.
- Never all modalities dropped: rows that drop too many get random dropped modalities back (uniformly among the
  dropped ones) until at least `min_modalities` remain: the fewest modalities whose tokens can hold K (1 when
  mask_ratio >= 1 - 1/M, e.g. 0.75 with 3 modalities). A bounded, symmetric rule, unlike redrawing, which could
  loop for p near 1. A config where the budget needs every modality cannot drop any: a ConfigError.
- Dirichlet alpha is 1 (BM-MAE's, MultiMAE's default): shares are normalised exponentials of the generator's
  uniforms, so the draw is seeded by one `torch.Generator` (torch's Dirichlet sampler takes none).
- Normalisation per modality (`norm`): a 3-channel modality uses the arch's mean/std (ImageNet), others (0.5, 0.5)
  unless given; the exported single-modality ViT carries its modality's statistics in its card. BM-MAE
  z-normalises each volume's non-zero voxels; fixed statistics keep the exported encoders usable by zoo's evals.
- Augmentation: MAE's RandomResizedCrop (0.2-1, bicubic) + horizontal flip, the same crop for every modality of a
  sample (BM-MAE: crop + 3-axis flips + intensity jitter on volumes).
- The decoder's dropout 0.1 in the fork is left out (MAE's decoder blocks, no dropout).
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import closing
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.layers import PatchEmbed, trunc_normal_

import zoo
from zoo.errors import ConfigError, SampleError
from zoo.recipes.base import DataSpec, Export
from zoo.models.vit import IMAGENET_MEAN, IMAGENET_STD
from zoo.recipes.mae import MAE, NORM_PIX_EPS, MAEDecoder, norm_pix_stats, patchify, unpatchify
from zoo.registry import RECIPES

MAX_REDRAWS = 64  # Dirichlet redraws of rows that exceed a modality's tokens before they are clipped instead
DEFAULT_MODALITIES = ("image", "thermal", "depth")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


# -- pure pieces -------------------------------------------------------------------------------
def min_modalities(counts: Sequence[int], keep: int) -> int:
    """The fewest modalities that can always hold `keep` visible tokens: the smallest k whose k smallest token
    counts add up to `keep` (so dropping all but any k of them leaves room for the budget)."""
    total = 0
    for k, n in enumerate(sorted(counts), start=1):
        total += n
        if total >= keep:
            return k
    raise ValueError(f"{keep} visible tokens do not fit in {sum(counts)} tokens")


def modality_dropout_mask(
    B: int, M: int, p: float, *, min_keep: int = 1, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, M) bool, True = modality dropped: each modality of each sample with probability `p`, then rows that
    kept fewer than `min_keep` get random dropped ones back (uniformly among them) until `min_keep` remain.
    Never drops every modality of a sample (min_keep >= 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout must be in [0, 1), got {p}")
    if not 1 <= min_keep <= M:
        raise ValueError(f"min_keep must be in 1..{M}, got {min_keep}")
    dropped = torch.rand(B, M, generator=generator, device=device) < p
    kept = ~dropped
    # kept modalities rank first (score >= 2), then the dropped ones in random order; keep the first max(kept, min)
    score = kept.float() * 2 + torch.rand(B, M, generator=generator, device=device)
    rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
    n_keep = kept.sum(1, keepdim=True).clamp(min=min_keep)
    return rank >= n_keep


def _largest_remainder(shares: torch.Tensor, total: int, allowed: torch.Tensor) -> torch.Tensor:
    """Integers (B, M) summing to `total` per row, closest to shares * total (largest-remainder rounding);
    the leftover units go to `allowed` modalities only."""
    raw = shares * total
    base = raw.floor().long()
    left = total - base.sum(1, keepdim=True)
    frac = torch.where(allowed, raw - base, torch.full_like(raw, -1.0))
    rank = torch.argsort(torch.argsort(frac, dim=1, descending=True), dim=1)
    return base + (rank < left).long()


def dirichlet_masking(
    B: int,
    counts: Sequence[int],
    mask_ratio: float,
    *,
    dropped: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MultiMAE's masking across modalities whose tokens are concatenated (`counts[m]` tokens each, N in all).

    Every sample keeps exactly K = int(N * (1 - mask_ratio)) tokens, split over its non-`dropped` modalities by
    Dirichlet(1) shares (largest-remainder rounding; a split that exceeds a modality's tokens is redrawn, then
    clipped after `MAX_REDRAWS`), the tokens chosen at random within each modality. Returns `ids_keep` (B, K),
    `ids_restore` (B, N) (argsort of the argsort of mask + noise: kept tokens first), `mask` (B, N) float
    1 = removed, and `visible` (B, M), the kept tokens per modality. All randomness is `generator`'s."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    M, N = len(counts), int(sum(counts))
    keep = int(N * (1 - mask_ratio))
    size = torch.tensor(list(counts), device=device).expand(B, M)
    dropped = torch.zeros(B, M, dtype=torch.bool, device=device) if dropped is None else dropped.to(device).bool()
    if tuple(dropped.shape) != (B, M):
        raise ValueError(f"dropped must be (batch, modalities) = {(B, M)}, got {tuple(dropped.shape)}")
    present = ~dropped
    room = size * present
    if bool((room.sum(1) < keep).any()):
        raise ValueError(f"some samples keep fewer than the {keep} visible tokens after dropping modalities")

    visible = torch.zeros(B, M, dtype=torch.long, device=device)
    todo = torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(MAX_REDRAWS):
        gamma = -torch.log1p(-torch.rand(B, M, generator=generator, device=device))  # Gamma(1) = Exp(1): Dirichlet(1)
        gamma = gamma * present
        shares = gamma / gamma.sum(1, keepdim=True).clamp_min(torch.finfo(gamma.dtype).tiny)
        draw = _largest_remainder(shares, keep, present)
        ok = (draw <= room).all(1)
        take = todo & ok
        visible = torch.where(take.unsqueeze(1), draw, visible)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
    else:  # clip the rows still over, and give their excess to the modalities with room (in order)
        draw = torch.minimum(draw, room)
        short = keep - draw.sum(1)
        for m in range(M):
            add = torch.minimum(room[:, m] - draw[:, m], short)
            draw[:, m] += add
            short = short - add
        visible = torch.where(todo.unsqueeze(1), draw, visible)

    noise = torch.rand(B, N, generator=generator, device=device)
    mask = torch.ones(B, N, device=device)
    start = 0
    for m, n in enumerate(counts):
        block = noise[:, start : start + n]
        rank = torch.argsort(torch.argsort(block, dim=1), dim=1)  # a random order within the modality
        mask[:, start : start + n] = (rank >= visible[:, m : m + 1]).float()
        start += n
    ids_shuffle = torch.argsort(mask + torch.rand(B, N, generator=generator, device=device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], ids_restore, mask, visible


def modality_losses(
    pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], mask: torch.Tensor, norm_pix: bool
) -> dict[str, torch.Tensor]:
    """{modality: MSE per patch averaged over that modality's removed patches}; `mask` (B, N) covers the
    modalities' tokens concatenated in `pred`'s order. MAE's norm-pix targets with `norm_pix`; a modality with no
    removed patch in the batch scores 0 (not NaN). Float32 whatever the autocast dtype."""
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, p in pred.items():
        n = p.shape[1]
        t = target[name].float()
        if norm_pix:
            mean, var = norm_pix_stats(t)
            t = (t - mean) / (var + NORM_PIX_EPS) ** 0.5
        per_patch = (p.float() - t).pow(2).mean(dim=-1)
        m = mask[:, start : start + n].to(per_patch.dtype)
        out[name] = (per_patch * m).sum() / m.sum().clamp_min(1.0)
        start += n
    if start != mask.shape[1]:
        raise ValueError(f"the mask has {mask.shape[1]} tokens, the predictions {start}")
    return out


# -- data --------------------------------------------------------------------------------------
class ModalityTransform:
    """A sample -> {modality: normalised float tensor (C_m, H, W)}: every modality cropped and flipped together
    (MAE's RandomResizedCrop 0.2-1, bicubic, + flip), converted to its channel count (1: PIL "L", 3: "RGB") and
    normalised with its own mean/std."""

    def __init__(self, specs: Mapping[str, tuple[int, tuple[float, ...], tuple[float, ...]]], size: int,
                 scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5):
        from torchvision.transforms import v2

        self.specs = dict(specs)
        self.geometry = v2.Compose([
            v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=hflip),
        ])

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from torchvision.transforms.v2 import functional as F

        group = {}
        for name, (channels, _, _) in self.specs.items():
            value = sample.get(name)
            if value is None:
                raise SampleError(f"bmmae: sample {sample.get('__key__')} has no {name!r} field; its fields: "
                                  f"{', '.join(sorted(k for k in sample if not k.startswith('__')))}")
            if not isinstance(value, Image.Image):
                value = Image.fromarray(np.asarray(value))
            value = value.convert("L" if channels == 1 else "RGB") if channels in (1, 3) else value
            group[name] = F.to_image(value)
        sizes = {k: tuple(v.shape[-2:]) for k, v in group.items()}
        if len(set(sizes.values())) > 1:
            raise SampleError(f"bmmae: the modalities of sample {sample.get('__key__')} differ in size: {sizes}; "
                              "they must match to be cropped together")
        out = {}
        for name, img in self.geometry(group).items():
            _, mean, std = self.specs[name]
            img = F.to_dtype(img, torch.float32, scale=True)
            out[name] = F.normalize(img, list(mean), list(std)).as_subclass(torch.Tensor)
        return out


def shard_fields(shards: str | list[str], n: int = 32) -> list[str]:
    """The fields of the shards' first `n` samples (from their member names, nothing decoded)."""
    from collections import Counter

    from zoo.data.fields import field_of
    from zoo.data.reader import iter_raw_samples
    from zoo.data.shards import expand_sources

    urls = [u for source in expand_sources(shards) for u in source]
    fields: set[str] = set()
    with closing(iter_raw_samples(urls, Counter())) as raws:
        for i, raw in enumerate(raws):
            fields |= {field_of(k) for k in raw if not k.startswith("__")}
            if i + 1 >= n:
                break
    return sorted(fields)


def modality_shards(shards: str, modality: str, out: str | Path | None = None) -> str:
    """Shards whose `image` is `modality`'s rendering (its member renamed, the RGB image left out, other fields
    kept), so zoo's evals, which read `image`, see e.g. the thermal scenes; written once (default: beside the
    source folder, `<folder>.<modality>-as-image`) and reused. Returns their pattern."""
    from collections import Counter

    from zoo.data.fields import field_of
    from zoo.data.reader import iter_raw_samples
    from zoo.data.shards import expand_sources
    from zoo.data.writer import write_shards

    if modality == "image":
        return shards
    urls = [u for source in expand_sources(shards) for u in source]
    source = Path(urls[0]).parent
    dest = Path(out) if out is not None else source.with_name(f"{source.name}.{modality}-as-image")
    if (dest / "sizes.json").is_file():
        return str(dest / "*.tar")
    if modality not in shard_fields(urls):
        raise ConfigError(f"bmmae: no sample of {shards} has a {modality!r} field; they have "
                          f"{', '.join(shard_fields(urls))}")

    def samples():
        with closing(iter_raw_samples(urls, Counter())) as raws:
            for raw in raws:
                members = {k: v for k, v in raw.items() if not k.startswith("__")}
                ext = next((k for k in members if field_of(k) == modality), None)
                if ext is None:
                    continue
                kept = {k: v for k, v in members.items() if field_of(k) not in ("image", modality)}
                kept[ext.rsplit(".", 1)[-1]] = members[ext]  # thermal.png -> png: the image field
                yield {"__key__": raw["__key__"], "__members__": kept}

    info = {}
    if (source / "dataset.json").is_file():
        info = {k: v for k, v in json.loads((source / "dataset.json").read_text()).items()
                if k not in ("num_samples", "fields", "shards")}
    info.update(image_field=modality, derived_from=str(source))
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(samples(), tmp, info=info, desc=f"{modality} as image")
    try:
        tmp.replace(dest)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest / "*.tar")


# -- decoder -----------------------------------------------------------------------------------
class BMMAEDecoder(MAEDecoder):
    """MAE's decoder over the concatenated modality blocks: + a learned modality embedding and the 2-D sin-cos of
    each block, shared blocks, one `decoder_pred` head per modality (p*p*C_m values)."""

    def __init__(self, channels: Mapping[str, int], grid_size: tuple[int, int], embed_dim: int, decoder_dim: int,
                 depth: int, num_heads: int, patch_size: int, mlp_ratio: float = 4.0):
        super().__init__(grid_size, embed_dim, decoder_dim, depth, num_heads, patch_size, 3, mlp_ratio)
        self.modalities = list(channels)
        self.modality_embed = nn.Parameter(torch.zeros(len(channels), decoder_dim))
        trunc_normal_(self.modality_embed, std=0.02)
        self.decoder_pred = nn.ModuleDict({m: nn.Linear(decoder_dim, patch_size * patch_size * c)
                                           for m, c in channels.items()})
        for head in self.decoder_pred.values():
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """latent (B, 1 + K, D), ids_restore (B, M*L) -> {modality: pred (B, L, p*p*C_m)}, every modality."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        visible = x[:, 1:]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        pos = self._pos_embed_for(grid or self.grid_size)
        L = pos.shape[1] - 1
        if n != L * len(self.modalities):
            raise ValueError(f"{n} tokens are not {len(self.modalities)} modalities of {L}")
        per_block = torch.cat([pos[:, 1:] + self.modality_embed[i] for i in range(len(self.modalities))], dim=1)
        x = torch.cat([x[:, :1] + pos[:, :1], x_ + per_block.to(x.dtype)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, 1:]
        return {m: self.decoder_pred[m](x[:, i * L : (i + 1) * L]) for i, m in enumerate(self.modalities)}


# -- the method --------------------------------------------------------------------------------
class BMMAE(MAE):
    """BM-MAE pretraining of one zoo ViT (`arch`) over several modalities, exported as one ViT per modality.

    `modalities`: sample fields, in token order (the first, or `image` when listed, uses the ViT's own patch
    embedding and is published under the recipe's name). `channels`: {modality: C} (default 3 for `image`, else 1).
    `norm`: {modality: {"mean": x or [..], "std": y or [..]}}. `modality_dropout`: probability per modality per
    sample in training (never all of a sample's). The rest is MAE's (decoder defaults: BM-MAE's 384/3/12).
    """

    recipe = "bmmae"

    def __init__(
        self,
        arch: str,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        modality_dropout: float = 0.0,
        channels: Mapping[str, int] | None = None,
        norm: Mapping[str, Mapping[str, Any]] | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        decoder_dim: int = 384,
        decoder_depth: int = 3,
        decoder_heads: int = 12,
        decoder_mlp_ratio: float = 4.0,
        **arch_overrides: Any,
    ):
        mods = self._check_modalities(modalities)
        p = modality_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"bmmae: modality_dropout must be in [0, 1) (at 1 every modality of every sample would "
                              f"be dropped; one is always kept), got {modality_dropout!r}")
        if p > 0 and len(mods) < 2:
            raise ConfigError(f"bmmae: modality_dropout needs at least 2 modalities (one is always kept), got {mods}")
        unknown = sorted(set(channels or {}) - set(mods)) + sorted(set(norm or {}) - set(mods))
        if unknown:
            raise ConfigError(f"bmmae: channels/norm name {unknown[0]!r}, which is not in modalities {mods}")
        if "in_chans" in arch_overrides:
            raise ConfigError("bmmae: set the channels per modality with method.channels ({image: 3, thermal: 1}), "
                              "not model.in_chans")
        chans = {m: int((channels or {}).get(m, 3 if m == "image" else 1)) for m in mods}
        if any(c < 1 for c in chans.values()):
            raise ConfigError(f"bmmae: channels must be >= 1, got {chans}")
        primary = "image" if "image" in mods else mods[0]
        norms = {m: self._check_norm(m, chans[m], (norm or {}).get(m)) for m in mods}
        if norms[primary] is not None:
            if "mean" in arch_overrides or "std" in arch_overrides:
                raise ConfigError(f"bmmae: {primary}'s mean/std are given twice (method.norm and model.mean/std); "
                                  "keep one")
            arch_overrides = {**arch_overrides, "mean": norms[primary][0], "std": norms[primary][1]}
        elif chans[primary] != 3 and not ("mean" in arch_overrides or "std" in arch_overrides):
            arch_overrides = {**arch_overrides, "mean": (0.5,) * chans[primary], "std": (0.5,) * chans[primary]}
        if arch_overrides.get("pos_embed", "sincos") != "sincos":
            raise ConfigError("bmmae: every modality block takes the fixed 2-D sin-cos position embedding; "
                              "leave model.pos_embed unset (sincos)")
        # plain attributes build_decoder reads while MAE's constructor runs
        self.modalities, self.channels, self.primary = mods, chans, primary
        self.modality_dropout = float(p)
        super().__init__(arch, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, decoder_dim=decoder_dim,
                         decoder_depth=decoder_depth, decoder_heads=decoder_heads, decoder_mlp_ratio=decoder_mlp_ratio,
                         in_chans=chans[primary], **arch_overrides)
        self.encoder_args = {"pos_embed": "sincos", "global_pool": "token", "num_classes": 0, **arch_overrides}
        pe = self.encoder.patch_embed
        self.patch_embeds = nn.ModuleDict({
            m: PatchEmbed(pe.img_size, pe.patch_size, chans[m], self.encoder.embed_dim, bias=pe.proj.bias is not None,
                          strict_img_size=False)
            for m in mods if m != primary
        })
        self._init_patch_embeds()
        cfg = self.encoder.pretrained_cfg
        self.specs: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {}  # modality -> (C, mean, std)
        for m, c in chans.items():
            if m == primary:
                mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
            elif norms[m] is not None:
                mean, std = norms[m]
            else:
                mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
            self.specs[m] = (c, mean, std)
        L = self.encoder.patch_embed.num_patches
        self.visible_tokens = int(len(mods) * L * (1 - self.mask_ratio))
        if self.visible_tokens < 1:
            raise ConfigError(f"bmmae: mask_ratio {mask_ratio} leaves no visible token of {len(mods) * L}")
        if p > 0 and min_modalities([L] * len(mods), self.visible_tokens) == len(mods):
            raise ConfigError(f"bmmae: with mask_ratio {mask_ratio} the {self.visible_tokens} visible tokens need "
                              f"all {len(mods)} modalities, so none can be dropped: raise mask_ratio to at least "
                              f"{1 - (len(mods) - 1) / len(mods):.3f} or set modality_dropout: 0")

    @staticmethod
    def _check_modalities(modalities: Any) -> list[str]:
        if isinstance(modalities, str):
            modalities = [modalities]
        mods = list(modalities or [])
        if not mods:
            raise ConfigError(f"bmmae: modalities is empty; list the sample fields to learn from, e.g. "
                              f"{list(DEFAULT_MODALITIES)}")
        bad = [m for m in mods if not isinstance(m, str) or not _NAME.fullmatch(m)]
        if bad:
            raise ConfigError(f"bmmae: modality {bad[0]!r} is not a field name (letters, digits, '_')")
        if len(set(mods)) != len(mods):
            raise ConfigError(f"bmmae: modalities lists a modality twice: {mods}")
        return mods

    @staticmethod
    def _check_norm(name: str, channels: int, spec: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        if spec is None:
            return None
        if not isinstance(spec, Mapping) or set(spec) != {"mean", "std"}:
            raise ConfigError(f"bmmae: norm of {name!r} must be {{mean: ..., std: ...}}, got {spec!r}")
        out = []
        for key in ("mean", "std"):
            v = spec[key]
            v = [v] * channels if isinstance(v, (int, float)) else list(v)
            if len(v) != channels or any(not isinstance(x, (int, float)) for x in v) or (key == "std" and min(v) <= 0):
                raise ConfigError(f"bmmae: norm {key} of {name!r} must be {channels} number(s)"
                                  f"{' > 0' if key == 'std' else ''}, got {spec[key]!r}")
            out.append(tuple(float(x) for x in v))
        return out[0], out[1]

    def _init_patch_embeds(self) -> None:
        for pe in getattr(self, "patch_embeds", {}).values():  # MAE's rule: xavier on the (D, C*p*p) view
            w = pe.proj.weight
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))

    def initialize_weights(self) -> None:
        """MAE's init, plus every modality's patch embedding (the decoder's modality embedding inits itself)."""
        super().initialize_weights()
        self._init_patch_embeds()

    def build_decoder(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
        return BMMAEDecoder(self.channels, self.encoder.patch_embed.grid_size, self.encoder.embed_dim, dim, depth,
                            heads, self.patch_size, mlp_ratio)

    # -- the hooks ----------------------------------------------------------------------------
    def inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: batch[m] for m in self.modalities}

    def modality_tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's patch tokens (B, L, D) with the shared 2-D sin-cos position embedding, no modality
        embedding: exactly what that modality's exported ViT computes."""
        if name == self.primary:
            return self.encoder.patch_tokens(x)
        grid = self._grid(x)
        return self.patch_embeds[name](x) + self.encoder._pos_embed_for(grid)[:, self.encoder.num_prefix_tokens :]

    def _check_inputs(self, inputs: Mapping[str, torch.Tensor], need_all: bool) -> list[str]:
        if not isinstance(inputs, Mapping) or not inputs:
            raise SampleError(f"bmmae: give a dict of at least one modality tensor (B, C, H, W) from {self.modalities}")
        unknown = [m for m in inputs if m not in self.modalities]
        if unknown:
            raise SampleError(f"bmmae: unknown modality {unknown[0]!r}; this model has {', '.join(self.modalities)}")
        names = [m for m in self.modalities if m in inputs]
        if need_all and len(names) < len(self.modalities):
            missing = [m for m in self.modalities if m not in inputs]
            raise SampleError(f"bmmae: the masked forward takes every modality, {missing} missing; pass a missing one "
                              "as zeros marked dropped, or use features() for a subset")
        shapes = {m: tuple(inputs[m].shape) for m in names}
        for m in names:
            s = shapes[m]
            if len(s) != 4 or s[1] != self.channels[m]:
                raise SampleError(f"bmmae: {m!r} must be (B, {self.channels[m]}, H, W), got {s}")
        if len({(s[0], *s[2:]) for s in shapes.values()}) > 1:
            raise SampleError(f"bmmae: the modalities differ in batch or image size: {shapes}")
        return names

    def tokenize(self, x: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Every modality's tokens, concatenated in `modalities` order: (B, M*L, D), and the grid."""
        names = self._check_inputs(x, need_all=True)
        return torch.cat([self.modality_tokens(m, x[m]) for m in names], dim=1), self._grid(x[names[0]])

    def sample_mask(self, B: int, N: int, ratio: float, device: torch.device, generator: torch.Generator | None = None,
                    dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dirichlet masking across the modalities; in training, after modality dropout (unless `dropped` is given)."""
        M = len(self.modalities)
        counts = [N // M] * M
        if dropped is None and self.training and self.modality_dropout > 0:
            keep = int(N * (1 - ratio))
            dropped = modality_dropout_mask(B, M, self.modality_dropout, min_keep=min_modalities(counts, keep),
                                            generator=generator, device=device)
        ids_keep, ids_restore, mask, _ = dirichlet_masking(B, counts, ratio, dropped=dropped, generator=generator,
                                                           device=device)
        return ids_keep, ids_restore, mask

    def targets(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: patchify(x[m], self.patch_size) for m in self.modalities}

    def reconstruction_loss(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                            mask: torch.Tensor) -> torch.Tensor:
        """The per-modality masked MSEs, summed."""
        return sum(modality_losses(pred, target, mask, self.norm_pix_loss).values())

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """loss = sum over modalities of each one's masked MSE (each logged as loss_<modality>), + extra terms."""
        x = self.inputs(batch)
        out = self.forward_masked(x)
        terms = modality_losses(out.pred, self.targets(x), out.mask, self.norm_pix_loss)
        extra = self.extra_losses(batch, x, out)
        loss = self.loss_weights.get("rec", 1.0) * sum(terms.values())
        loss = loss + sum(self.loss_weights.get(k, 1.0) * v for k, v in extra.items())
        B, M = out.mask.shape[0], len(self.modalities)
        unseen = out.mask.view(B, M, -1).min(dim=2).values.mean()  # (sample, modality) pairs with no visible token
        logged = {f"loss_{k}": v.detach() for k, v in {**terms, **extra}.items()}
        return {"loss": loss, **logged, "modality_unseen": unseen.detach(), "mask_ratio": torch.tensor(self.mask_ratio)}

    def data_spec(self) -> DataSpec:
        size = self.encoder.pretrained_cfg["input_size"][1]
        return DataSpec(fields=tuple(self.modalities), transform=ModalityTransform(self.specs, size),
                        prepare=self.check_shards)

    def check_shards(self, shards: str, builtin: bool) -> str:
        """A modality that none of the shards' first samples has is a one-line error naming the fields they have."""
        fields = shard_fields(shards)
        missing = [m for m in self.modalities if m not in fields]
        if missing:
            images = [f for f in fields if f not in ("label", "caption", "meta", "mask", "array")]
            raise ConfigError(f"bmmae: modality {missing[0]!r} is in no sample of the data; its samples have the fields "
                              f"{', '.join(fields)}; set method.modalities to some of {images}")
        return shards

    # -- any subset at evaluation -----------------------------------------------------------------
    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The class token (B, D) of the unmasked tokens of any non-empty subset of the modalities."""
        names = self._check_inputs(inputs, need_all=False)
        tokens = torch.cat([self.modality_tokens(m, inputs[m]) for m in names], dim=1)
        return self.encoder.forward_tokens(tokens)[:, 0]

    def modality_encoder(self, name: str) -> nn.Module:
        """`name` alone as a plain zoo ViT (in_chans C_m, its patch embedding, the shared blocks, its mean/std): a
        copy for the other modalities, the live encoder for the first."""
        if name == self.primary:
            return self.encoder
        c, mean, std = self.specs[name]
        with torch.random.fork_rng(devices=[]):  # building draws a random init: keep the training streams
            vit = zoo.create_model(self.arch, **{**self.encoder_args, "in_chans": c, "mean": mean, "std": std})
        state = {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("patch_embed.")}
        state.update({f"patch_embed.{k}": v for k, v in self.patch_embeds[name].state_dict().items()})
        vit.load_state_dict(state)
        return vit.to(self.encoder.pos_embed.device)

    def export(self, name: str) -> dict[str, Export]:
        """One ViT per modality: `name` for the first (`image`), `name_<modality>` for each other one."""
        out = {}
        for m in self.modalities:
            full = name if m == self.primary else f"{name}_{m}"
            card = {"bmmae": {"modality": m, "image_field": m, "modalities": list(self.modalities)}}
            out[full] = Export(self.modality_encoder(m), card=card)
        return out

    # -- pictures --------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Mapping[str, torch.Tensor], dropped: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """{modality: {"original", "masked", "reconstruction"}} images in [0, 1], 3 channels, after Dirichlet masking
        (and the modalities `dropped` (B, M), fully masked); norm-pix predictions use each target patch's stats."""
        tokens, grid = self.tokenize(x)
        B, N = tokens.shape[:2]
        ids_keep, ids_restore, mask = self.sample_mask(B, N, self.mask_ratio, tokens.device, generator, dropped)
        pred = self.decode(self.encode(tokens, ids_keep), ids_restore, grid)
        p, L = self.patch_size, N // len(self.modalities)
        out = {}
        for i, m in enumerate(self.modalities):
            c, mean, std = self.specs[m]
            pm = pred[m].float()
            if self.norm_pix_loss:
                mu, var = norm_pix_stats(patchify(x[m].float(), p))
                pm = pm * (var + NORM_PIX_EPS) ** 0.5 + mu
            mk = mask[:, i * L : (i + 1) * L].unsqueeze(-1).expand(-1, -1, p * p * c).float()
            mean_t = torch.tensor(mean, device=pm.device).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=pm.device).view(1, -1, 1, 1)

            def pixels(t: torch.Tensor) -> torch.Tensor:
                img = (t * std_t + mean_t).clamp(0, 1)
                return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img[:, :3]

            keep_img = 1 - unpatchify(mk, p, c, grid)
            out[m] = {"original": pixels(x[m].float()), "masked": pixels(x[m].float()) * keep_img[:, :1],
                      "reconstruction": pixels(unpatchify(pm, p, c, grid))}
        return out

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/reconstruction.png (every modality masked across modalities) and plots/missing.png (each modality
        dropped in turn, reconstructed from the others)."""
        from zoo.engine.plots import image_grid

        x = {m: v[:8] for m, v in self.inputs(batch).items()}
        B, M = next(iter(x.values())).shape[0], len(self.modalities)
        gen = lambda: torch.Generator(device=next(iter(x.values())).device).manual_seed(0)  # noqa: E731
        rec = self.reconstruct(x, generator=gen())
        rows, labels = [], []
        for m in self.modalities:
            for k in ("original", "masked", "reconstruction"):
                rows.append(rec[m][k])
                labels.append(f"{m} {k}")
        paths = [image_grid(rows, folder / "reconstruction.png", mean=(0, 0, 0), std=(1, 1, 1), row_labels=labels)]
        if M > 1:
            rows, labels = [], []
            for i, m in enumerate(self.modalities):
                dropped = torch.zeros(B, M, dtype=torch.bool, device=rec[m]["original"].device)
                dropped[:, i] = True
                rows += [rec[m]["original"], self.reconstruct(x, dropped, generator=gen())[m]["reconstruction"]]
                labels += [f"{m}", f"{m} from others"]
            paths.append(image_grid(rows, folder / "missing.png", mean=(0, 0, 0), std=(1, 1, 1), row_labels=labels))
        return paths


RECIPES.register(
    "bmmae",
    BMMAE,
    family="mae",
    paper="arXiv:2505.00568",
    cpu_recipe="bmmae_vit_tiny_patch4_32_scenes",
    description="BM-MAE: one ViT over several modalities (own patch embeddings, Dirichlet masking across them, "
                "modality dropout), any subset at evaluation; one ViT exported per modality",
)

__all__ = ["BMMAE", "BMMAEDecoder", "ModalityTransform", "dirichlet_masking", "modality_dropout_mask",
           "min_modalities", "modality_losses", "modality_shards", "shard_fields"]
