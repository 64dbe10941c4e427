"""CLIP with quality captions: contrastive image-text pretraining on open_clip towers.

The model and losses are open_clip's: a ViT image tower and a text transformer from an open_clip
config (randomly initialised), `ClipLoss` (Radford et al. 2021, arXiv:2103.00020: symmetric
cross-entropy over scaled cosine similarities) or `SigLipLoss` (Zhai et al. 2023, arXiv:2303.15343:
a sigmoid per pair, with a learnable bias), a learnable temperature clamped to at most 100 as in
open_clip's training loop. What this recipe adds is the *caption policy* of "CLIP with Quality
Captions" (Vasu et al. 2024, arXiv:2405.08911), sampled per sample in the loader as DataCompDR
(MobileCLIP, arXiv:2311.17049) does:

- `alt`: the alt-text only (plain CLIP on web data);
- `quality`: one quality caption, drawn uniformly from the sample's quality captions;
- `mix:p`: the alt-text, replaced by a uniformly drawn quality caption with probability p
  (DataCompDR's `--dataset-reinforcement-mix-synthetic`; a sample without one keeps its alt-text);
- `both`: DataCompDR's default mode a: alt-text and quality caption in one text batch,
  loss = L(image, alt) + L(image, quality).

Caption names: `alt_caption` and `quality_captions` name a top-level text field (`caption` is the
shards' `txt` member) or an entry of the `json` member's `captions` (see
`zoo.data.transforms.named_captions`). The defaults suit the built-in `scenes`, whose `noisy`
caption plays the web alt-text and `exact` / `short` the quality captions; for real shards use e.g.
`alt_caption: caption` and the names of the synthetic captions in the json.

Registered as `RECIPES["clip"]`; `export()` gives the image tower (published under `output.publish`,
e.g. `clip_vit_nano_patch4_32.TAG`) and the whole model (under its own arch and the same tag,
`clip_nano_patch4_32.TAG`, for zero-shot and retrieval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn as nn

import zoo
from zoo.data.pipeline import dist_info
from zoo.data.transforms import choose_caption, named_captions, train_transform
from zoo.errors import ConfigError
from zoo.models.clip import resolve_clip_arch
from zoo.recipes.base import DataSpec, Method, Progress
from zoo.registry import RECIPES

CAPTION_POLICIES = ("alt", "quality", "mix:P", "both")
LOSSES = ("clip", "siglip")
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnt log-temperature to [0, log 100]
INIT_LOGIT_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10)}
INIT_LOGIT_BIAS = {"clip": None, "siglip": -10.0}


# -- caption policy ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionPolicy:
    """Which caption(s) a sample contributes: `kind` alt | quality | mix | both; `p` for mix."""

    kind: Literal["alt", "quality", "mix", "both"]
    p: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> CaptionPolicy:
        """`alt`, `quality`, `both` or `mix:P` with P in [0, 1]; anything else is a ConfigError."""
        valid = f"valid: {', '.join(CAPTION_POLICIES)} (P a probability in [0, 1], e.g. mix:0.3)"
        text = str(spec).strip()
        if text in ("alt", "quality", "both"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("mix:"):
            try:
                p = float(text[4:])
            except ValueError:
                p = math.nan
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"clip: captions {spec!r} needs a probability P in [0, 1] after 'mix:'; {valid}")
            return cls("mix", p)
        raise ConfigError(f"clip: unknown caption policy {spec!r}; {valid}")

    def __str__(self) -> str:
        return f"mix:{self.p:g}" if self.kind == "mix" else self.kind


class CaptionSampler:
    """The per-sample transform (`DataSpec.transform`, run in loader workers): the image through
    `image` (the train transform), then the caption choice and its tokens.

    Every draw comes from torch's global RNG, which the loader seeds per worker, so a run's
    caption stream is fixed by its seed.
    """

    def __init__(self, policy: CaptionPolicy, alt: str, quality: Sequence[str],
                 tokenizer: Callable[[list[str]], torch.Tensor], image: Callable[[Any], torch.Tensor] | None = None):
        self.policy, self.alt, self.quality, self.tokenizer = policy, alt, tuple(quality), tokenizer
        self.image = image

    def alt_caption(self, sample: Mapping[str, Any]) -> str:
        return choose_caption(sample, {self.alt: 1.0})[1]

    def quality_caption(self, sample: Mapping[str, Any]) -> str:
        """Uniform over all the sample's quality captions (a name holding a list counts each entry)."""
        counts = {name: float(len(named_captions(sample, name))) for name in self.quality}
        return choose_caption(sample, counts)[1]

    def choose(self, sample: Mapping[str, Any]) -> list[str]:
        """The texts the sample trains on: one, or (alt, quality) for `both`."""
        kind = self.policy.kind
        if kind == "alt":
            return [self.alt_caption(sample)]
        if kind == "quality":
            return [self.quality_caption(sample)]
        if kind == "both":
            return [self.alt_caption(sample), self.quality_caption(sample)]
        replace = float(torch.rand(())) < self.policy.p  # drawn for every sample: one stream whatever p
        if replace and any(named_captions(sample, name) for name in self.quality):
            return [self.quality_caption(sample)]
        return [self.alt_caption(sample)]

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """{"image", "text": LongTensor (context,)} and, for `both`, "text_quality"."""
        image = sample["image"] if self.image is None else self.image(sample["image"])
        tokens = self.tokenizer(self.choose(sample))
        out = {"image": image, "text": tokens[0]}
        if self.policy.kind == "both":
            out["text_quality"] = tokens[1]
        return out


# -- loss --------------------------------------------------------------------------------------
def make_loss(kind: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's loss: `ClipLoss` with local loss + gathering with gradients (open_clip's
    `--local-loss --gather-with-grad`), or `SigLipLoss` (ring exchange across ranks)."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)
    return SigLipLoss(rank=rank, world_size=world_size)


# -- the method --------------------------------------------------------------------------------
class CLIP(Method):
    """Contrastive image-text pretraining of a zoo CLIP architecture (`zoo.models.clip`).

    `arch` names the whole model (`clip_nano_patch4_32`), its image tower or its open_clip config
    (`ViT-B-16`). `init_logit_scale` / `init_logit_bias` default to log(1/0.07) / none for `clip`
    and log(10) / -10 for `siglip`.
    """

    def __init__(
        self,
        arch: str,
        loss: Literal["clip", "siglip"] = "clip",
        captions: str = "alt",
        alt_caption: str = "noisy",
        quality_captions: tuple[str, ...] = ("exact", "short"),
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"clip: unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.policy = CaptionPolicy.parse(captions)
        if not isinstance(alt_caption, str) or not alt_caption:
            raise ConfigError(
                f"clip: alt_caption must name a caption, e.g. 'caption' (the txt member); got {alt_caption!r}"
            )
        quality = (quality_captions,) if isinstance(quality_captions, str) else tuple(quality_captions)
        if self.policy.kind != "alt" and (not quality or not all(isinstance(q, str) and q for q in quality)):
            raise ConfigError(f"clip: captions {str(self.policy)!r} needs quality_captions, caption names such as "
                              f"['exact', 'short']; got {quality_captions!r}")
        if alt_caption in quality:
            raise ConfigError(f"clip: {alt_caption!r} is both alt_caption and one of quality_captions; name it once")
        self.arch = resolve_clip_arch(arch)
        self.loss_kind = loss
        self.alt_caption, self.quality_captions = alt_caption, quality
        scale = INIT_LOGIT_SCALE[loss] if init_logit_scale is None else float(init_logit_scale)
        bias = INIT_LOGIT_BIAS[loss] if init_logit_bias is None else float(init_logit_bias)
        inits = {"init_logit_scale": scale, **({"init_logit_bias": bias} if bias is not None else {})}
        self.model = zoo.create_model(self.arch.clip_arch, **inits)
        self.loss_fn = make_loss(loss, *dist_info())  # the engine sets up torch.distributed first

    # -- the pure step ---------------------------------------------------------------------------
    def contrastive_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """open_clip's loss of L2-normalised embeddings (float32) at the current scale (and bias)."""
        bias = self.model.logit_bias
        return self.loss_fn(image_emb.float(), text_emb.float(), self.model.logit_scale.exp().float(),
                            *(() if bias is None else (bias.float(),)))

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        image_emb = self.model.encode_image(batch["image"], normalize=True)
        texts = batch["text"]
        both = self.policy.kind == "both"
        if both:
            texts = torch.cat([texts, batch["text_quality"]])  # one text batch: [alt; quality]
        text_emb = self.model.encode_text(texts, normalize=True)
        out: dict[str, torch.Tensor] = {}
        if both:
            n = len(image_emb)
            out["loss_alt"] = self.contrastive_loss(image_emb, text_emb[:n])
            out["loss_quality"] = self.contrastive_loss(image_emb, text_emb[n:])
            loss = out["loss_alt"] + out["loss_quality"]
        else:
            loss = self.contrastive_loss(image_emb, text_emb)
        out = {"loss": loss, **{k: v.detach() for k, v in out.items()},
               "logit_scale": self.model.logit_scale.detach().exp()}
        if self.model.logit_bias is not None:
            out["logit_bias"] = self.model.logit_bias.detach()
        return out

    def on_step_end(self, progress: Progress) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # param_groups: the base class's rule is open_clip's: no weight decay for 1-D parameters (gains,
    # biases, the class embedding), logit_scale and logit_bias; position and token embeddings decay.

    def data_spec(self) -> DataSpec:
        names = (self.alt_caption, *self.quality_captions) if self.policy.kind != "alt" else (self.alt_caption,)
        # open_clip's training crop (scale 0.9-1, no flip: captions say "left" and "right")
        image = train_transform(self.model.visual.pretrained_cfg, scale=(0.9, 1.0), hflip=0.0, interpolation="bicubic")
        sampler = CaptionSampler(self.policy, self.alt_caption, self.quality_captions, self.model.tokenizer, image)
        return DataSpec(fields=("image",), optional_fields=tuple(dict.fromkeys((*names, "meta"))), transform=sampler)

    def backbone(self) -> nn.Module:
        """The image tower, a zoo backbone: online kNN and the final evals read it."""
        return self.model.visual

    def export(self, name: str) -> dict[str, nn.Module]:
        """The image tower under `name` and the whole model (zero-shot, retrieval) under its own arch
        with the same tag: `clip_vit_nano_patch4_32.T` and `clip_nano_patch4_32.T`."""
        tag = name.split(".", 1)[1]
        return {name: self.model.visual, f"{self.arch.clip_arch}.{tag}": self.model}


RECIPES.register(
    "clip",
    CLIP,
    family="clip",
    paper="arXiv:2405.08911",
    cpu_recipe="clip_nano_patch4_32_scenes",
    description="CLIP / SigLIP on open_clip towers, with alt-text, quality or mixed captions (DataCompDR sampling)",
)

__all__ = ["CLIP", "CaptionPolicy", "CaptionSampler", "make_loss", "CAPTION_POLICIES", "LOSSES"]
