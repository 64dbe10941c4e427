"""CLIP from open_clip, registered as zoo architectures: the image tower and the whole model.

Architectures are data: open_clip model configs, ours at CPU scale in `clip_configs/*.json`
(registered with open_clip the first time a model is built) and open_clip's own (`ViT-B-16`).
Each config gives two architectures (`CLIP_ARCHS`):

- `clip_vit_*`, the image tower (`ClipImageTower`): open_clip's ViT parameters under open_clip's
  own names (an open_clip checkpoint's `visual.*` keys with the prefix stripped), with zoo's feature
  API on top: `forward_features` (tokens), `forward_head` / `forward` (the projected, pooled image
  embedding, i.e. `encode_image`), `forward_intermediates`, `pretrained_cfg` (OpenAI CLIP mean/std).
- `clip_*`, the whole model: open_clip's `CLIP` (encode_image, encode_text, logit_scale and, for
  SigLIP, logit_bias) whose `visual` is that tower, plus `tokenizer` (open_clip's, for the config)
  and `pretrained_cfg`, so zero-shot and retrieval (`zoo.eval`) run on it. Its state dict is
  open_clip's, key for key, so a published one carries an `open_clip_config.json` (`open_clip_config`)
  and open_clip loads it as its own.

open_clip is imported only when a model is built (importing it takes seconds), never with zoo.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from zoo.errors import ConfigError, UnknownNameError
from zoo.models.vit import take_indices
from zoo.registry import MODELS, close_matches

CONFIG_DIR = Path(__file__).with_name("clip_configs")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipArch:
    """One open_clip model config and the two zoo architectures built from it."""

    config: str  # open_clip model config name
    image_arch: str  # the image tower
    clip_arch: str  # the whole model


CLIP_ARCHS: tuple[ClipArch, ...] = (
    # CPU scale: patch-4 ViTs on 32 px shaped as zoo's vit_nano (width 128, 4 blocks, 4 heads) and
    # vit_tiny (192, 6, 3), each with a 3-block, 128-wide text transformer (context 32, open_clip's
    # BPE vocabulary) and a 128-d joint embedding.
    ClipArch("ViT-nano-4-32", image_arch="clip_vit_nano_patch4_32", clip_arch="clip_nano_patch4_32"),
    ClipArch("ViT-tiny-4-32", image_arch="clip_vit_tiny_patch4_32", clip_arch="clip_tiny_patch4_32"),
    ClipArch("ViT-B-16", image_arch="clip_vit_base_patch16_224", clip_arch="clip_base_patch16_224"),
)


# -- open_clip, on first use -------------------------------------------------------------------
@functools.cache
def _open_clip():
    """The open_clip module, with our configs added to its registry (once)."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return open_clip


class _QuietRandomInit(logging.Filter):
    """Drops open_clip's 'No pretrained weights loaded ... initialized randomly' warning: random
    init is what zoo.create_model means; published weights are loaded by zoo.load afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def create_open_clip(config: str, **kwargs: Any) -> nn.Module:
    """open_clip's model for `config`, randomly initialised (`pretrained=None`), on torch's default
    device (so it also builds on the meta device); `kwargs` override the config (e.g. init_logit_bias)."""
    open_clip = _open_clip()
    if config not in open_clip.list_models():
        hint = close_matches(config, open_clip.list_models())
        raise UnknownNameError(f"open_clip has no model config {config!r}"
                               + (f"; did you mean: {', '.join(hint)}?" if hint else ""))
    root, quiet = logging.getLogger(), _QuietRandomInit()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(config, pretrained=None, device=torch.get_default_device(), **kwargs)
    finally:
        root.removeFilter(quiet)


@functools.cache
def clip_tokenizer(config: str) -> Callable[[str | list[str]], torch.Tensor]:
    """open_clip's tokenizer for a model config: texts -> LongTensor (N, context_length)."""
    return _open_clip().get_tokenizer(config)


# -- the image tower ---------------------------------------------------------------------------
class ClipImageTower(nn.Module):
    """open_clip's VisionTransformer (its submodules and parameter names) with zoo's feature API.

    `forward(x)` is open_clip's `visual(x)`: tokens -> ln_post -> class token (or mean patch token
    for `pool_type: avg`) -> `@ proj`, the embedding CLIP aligns with text; with `num_classes > 0`
    a linear head follows. `num_features` is that embedding's width. Other input sizes resample the
    position embedding.
    """

    num_prefix_tokens = 1  # open_clip's ViT always has a class token

    def __init__(self, visual: nn.Module, num_classes: int = 0):
        super().__init__()
        from open_clip.transformer import VisionTransformer as OpenClipViT

        plain = isinstance(visual, OpenClipViT) and visual.attn_pool is None and visual.pool_type in ("tok", "avg")
        if not plain:
            raise ConfigError(
                f"ClipImageTower wraps open_clip's plain ViT (class-token or average pooling, no attentional "
                f"pooler); got a {type(visual).__name__}. Use a ViT config such as ViT-B-16"
            )
        if not visual.transformer.batch_first:
            raise ConfigError("ClipImageTower needs open_clip's batch-first transformer (open_clip >= 2.24)")
        # open_clip's own submodules, under its own names: the state dict is open_clip's `visual.*`
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.pool_type: str = visual.pool_type
        self.final_ln_after_pool: bool = visual.final_ln_after_pool
        self.image_size = tuple(visual.image_size)
        self.patch_size = tuple(visual.patch_size)
        self.grid_size = tuple(visual.grid_size)
        self.width = self.conv1.out_channels
        self.num_features = self.proj.shape[1] if self.proj is not None else self.width
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", None) or {})  # open_clip's helpers read it
        pp = self.preprocess_cfg
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (3, *self.image_size),
            "mean": tuple(pp.get("mean") or OPENAI_CLIP_MEAN),
            "std": tuple(pp.get("std") or OPENAI_CLIP_STD),
            "interpolation": pp.get("interpolation") or "bicubic",
            "crop_pct": 1.0,  # open_clip's eval: resize the shorter side to the input size, center crop
            "num_classes": num_classes,
        }

    # -- what zoo's evals and engine read --------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (open_clip's `transformer.resblocks`)."""
        return self.transformer.resblocks

    @property
    def patch_embed(self) -> SimpleNamespace:
        """The patch geometry, as timm's `patch_embed` exposes it (the patchifying conv is `conv1`)."""
        return SimpleNamespace(patch_size=self.patch_size, grid_size=self.grid_size,
                               num_patches=self.grid_size[0] * self.grid_size[1])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding", "class_embedding"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's depth grouping (stem, one group per block, final norm and projection last)."""
        return {"stem": r"^class_embedding|^positional_embedding|^conv1|^ln_pre",
                "blocks": [(r"^transformer\.resblocks\.(\d+)", None), (r"^ln_post|^proj", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    # -- the uniform feature API -----------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token first, plus position embedding, patch dropout, ln_pre."""
        b, _, h, w = x.shape
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.positional_embedding.unsqueeze(0)
        if tuple(grid) == self.grid_size:
            return pos
        return resample_abs_pos_embed(pos, list(grid), list(self.grid_size), num_prefix_tokens=1)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.final_ln_after_pool else self.ln_post(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens (B, 1 + N, width) after the blocks and ln_post (ln_post comes after pooling
        instead for configs with `final_ln_after_pool`)."""
        return self._final_norm(self.transformer(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of `forward_features` and project them: the CLIP image embedding
        (`pre_logits=True`), then the classifier head if there is one."""
        pooled = x[:, self.num_prefix_tokens :].mean(dim=1) if self.pool_type == "avg" else x[:, 0]
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return pooled if pre_logits else self.head(pooled)

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
        """Outputs of chosen blocks, zoo/timm semantics as `zoo.models.vit.VisionTransformer`'s: patch
        maps (NCHW) or tokens (NLC), `norm` applying ln_post; with the final tokens of
        `forward_features` unless `intermediates_only`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = take_indices(len(self.blocks), indices)
        b, _, h, w = x.shape
        grid = (h // self.patch_size[0], w // self.patch_size[1])
        x, feats = self.transformer.forward_intermediates(
            self.embed(x), indices=take, stop_early=stop_early or intermediates_only
        )
        if norm:
            feats = [self.ln_post(f) for f in feats]
        prefix = [f[:, : self.num_prefix_tokens] for f in feats]
        feats = [f[:, self.num_prefix_tokens :] for f in feats]
        if output_fmt == "NCHW":
            feats = [f.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if return_prefix_tokens:
            feats = list(zip(feats, prefix))
        if intermediates_only:
            return feats
        return self._final_norm(x), feats


# -- architectures -----------------------------------------------------------------------------
def _gelu(quick_gelu: bool, key: str = "force_quick_gelu") -> dict[str, bool]:
    """The keyword that selects QuickGELU (open_clip's `force_quick_gelu`, or zoo's arch argument), only when set."""
    return {key: True} if quick_gelu else {}


def _image_tower_factory(arch: ClipArch) -> Callable[..., ClipImageTower]:
    def build(num_classes: int = 0, quick_gelu: bool = False) -> ClipImageTower:
        """`quick_gelu`: OpenAI's activation (its released CLIPs were trained with it)."""
        return ClipImageTower(create_open_clip(arch.config, **_gelu(quick_gelu)).visual, num_classes=num_classes)

    return build


def _clip_factory(arch: ClipArch) -> Callable[..., nn.Module]:
    def build(init_logit_scale: float | None = None, init_logit_bias: float | None = None,
              quick_gelu: bool = False) -> nn.Module:
        """open_clip's CLIP with zoo's image tower as `visual`; `init_logit_bias` adds SigLIP's bias, `quick_gelu`
        OpenAI's activation (its released CLIPs were trained with it)."""
        from open_clip.model import CLIP

        inits = {"init_logit_scale": init_logit_scale, "init_logit_bias": init_logit_bias}
        model = create_open_clip(arch.config, **{k: v for k, v in inits.items() if v is not None}, **_gelu(quick_gelu))
        if type(model) is not CLIP:
            raise ConfigError(
                f"{arch.config} builds an open_clip {type(model).__name__}; {arch.clip_arch} needs a plain CLIP"
            )
        tower = ClipImageTower(model.visual)
        tower.zoo_arch, tower.zoo_args = arch.image_arch, _gelu(quick_gelu, "quick_gelu")  # publishable on its own
        model.visual = tower
        model.pretrained_cfg = dict(tower.pretrained_cfg)
        model.tokenizer = clip_tokenizer(arch.config)
        return model

    return build


def open_clip_config(model: nn.Module) -> dict[str, Any] | None:
    """The `open_clip_config.json` of a whole zoo CLIP model (`model_cfg` + `preprocess_cfg`), which lets
    open_clip's `local-dir:`/`hf-hub:` loaders build it without zoo; None for any other model."""
    arch = next((a for a in CLIP_ARCHS if a.clip_arch == getattr(model, "zoo_arch", None)), None)
    if arch is None:
        return None
    model_cfg = _open_clip().get_model_config(arch.config)
    model_cfg.update({k: v for k, v in getattr(model, "zoo_args", {}).items() if v is not None})  # init_logit_*,
    # quick_gelu: open_clip's own config keys
    pcfg, visual = model.pretrained_cfg, model.visual
    preprocess = {
        "size": list(visual.image_size),
        "mean": list(pcfg["mean"]),
        "std": list(pcfg["std"]),
        "interpolation": pcfg.get("interpolation", "bicubic"),
        "resize_mode": visual.preprocess_cfg.get("resize_mode", "shortest"),
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def resolve_clip_arch(name: str) -> ClipArch:
    """The CLIP architecture named by its whole-model arch, its image-tower arch or its open_clip config."""
    for arch in CLIP_ARCHS:
        if name in (arch.clip_arch, arch.image_arch, arch.config):
            return arch
    valid = [a.clip_arch for a in CLIP_ARCHS]
    hint = close_matches(name, valid + [a.image_arch for a in CLIP_ARCHS] + [a.config for a in CLIP_ARCHS], n=1)
    raise ConfigError(
        f"{name!r} is not a CLIP architecture; use one of {', '.join(valid)} (or its image tower or open_clip "
        f"config name, e.g. {CLIP_ARCHS[-1].config})" + (f"; did you mean {hint[0]!r}?" if hint else "")
    )


for _arch in CLIP_ARCHS:
    MODELS.register(_arch.image_arch, _image_tower_factory(_arch), family="clip", modality="image",
                    open_clip_config=_arch.config, clip_arch=_arch.clip_arch, defaults={})
    MODELS.register(_arch.clip_arch, _clip_factory(_arch), family="clip", modality="image-text",
                    open_clip_config=_arch.config, image_arch=_arch.image_arch, defaults={})

__all__ = ["CLIP_ARCHS", "ClipArch", "ClipImageTower", "clip_tokenizer", "create_open_clip", "open_clip_config",
           "resolve_clip_arch"]
