"""FLAME: language-image pretraining with a frozen language model as the text encoder.

Cao, Wei, Ma, "FLAME: Frozen Large Language Models Enable Data-Efficient Language-Image Pre-training",
CVPR 2025, arXiv:2411.11927. What trains is the image side only (`zoo.models.flame.FLAME`): a ViT, a per-token
MLP projector into the LM's width, then the mean over patch tokens. The text side is a frozen causal LM whose
facet-prompt embeddings (1 raw + 3 short + 7 long = 11 rows per sample, L2-normalised, fp16) were computed
ONCE, offline, into the shards (`zoo embed-text`, `zoo.eval.text_embedding`): no LM runs during training.
Every time a sample is loaded, `positives` (6) of its rows are drawn without replacement
(`torch.randperm(11)[:6]`), and the loss is FLAME's multi-positive sigmoid loss, SigLIP's with several
positives per image: L = -1/(N m) sum_ij log sigmoid(y_ij (t <x_i, T_j> + b)), y_ij = +1 when text j is one of
image i's m rows, t = exp(s) from s = log 10 and b = -10, both learnt. The cached rows are not re-normalised
(they were normalised when cached, FLAME's `model.py`).

With no `--data` the recipe builds its prerequisites once and caches them: the small LM (the recipe that
publishes `lm`, e.g. `lm_llama_nano_scenes`, when it is not in the store) and the built-in scenes embedded
with it (under $ZOO_HOME/data). Your own shards must carry the embeddings: the error names the
`zoo embed-text` command that writes them.

Registered as `RECIPES["flame"]`; `export()` publishes the image tower (a backbone, `output.publish`) and the
whole model (`flame_ARCH.TAG`: image side + the LM's name, for zero-shot and retrieval through the LM).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.data.pipeline import dist_info
from zoo.data.transforms import train_transform
from zoo.engine.distributed import all_gather
from zoo.errors import ConfigError, SampleError, UnknownNameError
from zoo.models.flame import CACHE_LAYOUT, PROMPTS
from zoo.recipes.base import DataSpec, Method, Progress, recipes_publishing
from zoo.registry import MODELS, RECIPES

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # open_clip's training loop clamps the learnt log-temperature to [0, log 100]
BUILTIN_CAPTIONS = {"raw": "noisy", "short": "exact", "long": "long"}  # scenes: alt-text, a sentence, a paragraph


# -- the loss ------------------------------------------------------------------------------------------
def multi_positive_sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                                logit_bias: torch.Tensor, positives: int, first_image: int = 0) -> torch.Tensor:
    """FLAME's `MultiPositiveSigmoidLoss`: image i (of N, numbered from `first_image` among all ranks' images)
    against every text j (image-major: text j belongs to image j // positives), -sum log sigmoid(y * logits) /
    (N * positives). With one positive and one rank it is open_clip's `SigLipLoss`."""
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    owner = torch.arange(text_emb.shape[0], device=logits.device) // positives
    mine = torch.arange(first_image, first_image + image_emb.shape[0], device=logits.device)
    labels = torch.where(owner[None, :] == mine[:, None], 1.0, -1.0)
    return -F.logsigmoid(labels * logits).sum() / (image_emb.shape[0] * positives)


def gather_texts(text_emb: torch.Tensor, positives: int) -> tuple[torch.Tensor, int]:
    """All ranks' text rows (they are constants: no gradient to route) and this rank's first image's index.
    FLAME exchanges them in a ring; gathering computes the same sums."""
    rank, _ = dist_info()
    return all_gather(text_emb), rank * (text_emb.shape[0] // positives)  # equal batches: drop_last


# -- data ----------------------------------------------------------------------------------------------
class FacetSampler:
    """The per-sample transform (loader workers): the image through the train crop, and `positives` of the
    sample's cached rows drawn without replacement (torch's stream, seeded per worker)."""

    def __init__(self, image: Any, field: str, n_facets: int, dim: int, positives: int):
        self.image, self.field, self.n_facets, self.dim, self.positives = image, field, n_facets, dim, positives

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        rows = sample[self.field]
        if getattr(rows, "shape", None) != (self.n_facets, self.dim):
            raise SampleError(f"flame: {self.field}.npy is {getattr(rows, 'shape', None)}, the recipe needs "
                              f"({self.n_facets}, {self.dim})")
        pick = torch.randperm(self.n_facets)[: self.positives]
        return {"image": self.image(sample["image"]), "text": torch.from_numpy(rows)[pick]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60]


# -- the method ----------------------------------------------------------------------------------------
class Flame(Method):
    """FLAME's image side trained on cached frozen-LM facet embeddings.

    `lm`: the text encoder's name (any `zoo.load` name of a causal LM); `positives`: rows drawn per sample (m);
    `facets`: rows cached per sample (11; fewer when the shards were embedded without some prompt kinds);
    `captions`: for the built-in data, the caption each prompt kind embeds; `field`: the member holding the
    rows (`KEY.flame.npy`); `layer` / `positions`: how the LM embeds (see `zoo.models.flame`).
    """

    def __init__(self, arch: str = "flame_vit_tiny_patch4_32", lm: str = "llama_nano.scenes_captions",
                 positives: int = 6, facets: int | None = None, captions: Mapping[str, str | None] | None = None,
                 field: str = "flame", layer: int | None = None, positions: str = "restart",
                 mm_hidden: int | None = None, crop_scale: Sequence[float] = (0.9, 1.0), embed_batch_size: int = 64,
                 **arch_args: Any):
        super().__init__()
        if MODELS.get(arch).meta.get("family") != "flame":
            flames = ", ".join(MODELS.names("flame_*"))
            raise ConfigError(f"flame: {arch!r} is not a FLAME architecture; use one of {flames}")
        self.captions = {**BUILTIN_CAPTIONS, **dict(captions or {})}
        unknown = set(self.captions) - set(CACHE_LAYOUT)
        if unknown:
            raise ConfigError(f"flame: captions has unknown prompt kind(s) {sorted(unknown)}; the kinds are "
                              f"{', '.join(CACHE_LAYOUT)}")
        expected = sum(len(PROMPTS[k].facets) for k in CACHE_LAYOUT if self.captions.get(k))
        self.n_facets = int(facets) if facets is not None else expected
        if not 1 <= int(positives) <= self.n_facets:
            raise ConfigError(f"flame: positives must be in 1..{self.n_facets} (the cached rows per sample), "
                              f"got {positives!r}")
        self.lm_name, self.positives, self.field = lm, int(positives), field
        self.layer, self.positions, self.embed_batch_size = layer, positions, int(embed_batch_size)
        self.crop_scale = tuple(float(c) for c in crop_scale)
        self.lm_card = ensure_lm(lm)
        width = int(self.lm_card["hidden_size"])
        self.model = zoo.create_model(arch, lm=lm, embed_dim=width, mm_hidden=mm_hidden, layer=layer, **arch_args)

    # -- the step --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        image_emb = F.normalize(self.model.encode_image(batch["image"]).float(), dim=-1)
        texts, first = gather_texts(batch["text"].flatten(0, 1).float(), self.positives)  # cached rows: not re-normalised
        loss = multi_positive_sigmoid_loss(image_emb, texts, self.model.logit_scale.exp(), self.model.logit_bias,
                                           self.positives, first)
        return {"loss": loss, "logit_scale": self.model.logit_scale.detach().exp(),
                "logit_bias": self.model.logit_bias.detach()}

    def on_step_end(self, progress: Progress) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- data ------------------------------------------------------------------------------------------
    def embed_command(self, data: str = "SHARDS", out: str = "DIR") -> str:
        opts = " ".join(f"--{k}-caption {v}" for k, v in self.captions.items() if v)
        return f"zoo embed-text --lm {self.lm_name} --data '{data}' --out {out} {opts} --field {self.field}"

    def prepare_shards(self, shards: str, builtin: bool) -> str:
        """Built-in data: embedded once with the recipe's LM into $ZOO_HOME/data (reused after); other shards:
        checked for the embedding member and its shape."""
        from zoo.data.shards import expand_sources
        from zoo.eval.text_embedding import check_embedded, embed_text_shards, read_embedding_info

        urls = [u for source in expand_sources(shards) for u in source]
        if builtin:
            from zoo.engine.trainer import data_root

            key = json.dumps([self.lm_name, self.lm_card.get("weights_sha256"), self.captions, self.layer,
                              self.positions, self.field], sort_keys=True)
            folder = Path(urls[0]).parent
            out = data_root() / f"{folder.name}.{self.field}-{_slug(self.lm_name)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
            if not (out / "dataset.json").is_file():
                log.info("flame: embedding the built-in captions with %s into %s (once)", self.lm_name, out)
                embed_text_shards(self.lm_name, urls, out, captions=self.captions, field=self.field, layer=self.layer,
                                  positions=self.positions, batch_size=self.embed_batch_size)
            return str(out / "*.tar")
        info = read_embedding_info(urls)
        if info is not None and info.get("field") == self.field and info.get("lm") != self.lm_name:
            log.warning("flame: the shards were embedded with %s, the recipe names %s as its LM (zero-shot and "
                        "retrieval use the recipe's)", info.get("lm"), self.lm_name)
        check_embedded(urls, self.field, self.n_facets, int(self.lm_card["hidden_size"]), self.embed_command(shards))
        return shards

    def data_spec(self) -> DataSpec:
        # open_clip's training crop as FLAME trains it: scale (0.9, 1), no flip (captions say left and right)
        image = train_transform(self.model.visual.pretrained_cfg, scale=self.crop_scale, hflip=0.0,
                                interpolation="bicubic")
        sampler = FacetSampler(image, self.field, self.n_facets, int(self.lm_card["hidden_size"]), self.positives)
        return DataSpec(fields=("image", self.field), transform=sampler, prepare=self.prepare_shards)

    # -- models ----------------------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The image tower (avg-pooled tokens without the projector: FLAME's linear-probe features)."""
        return self.model.visual

    def export(self, name: str) -> dict[str, nn.Module]:
        """The image tower under `name` and the whole model under its own arch with the same tag."""
        tag = name.split(".", 1)[1]
        return {name: self.model.visual, f"{self.model.zoo_arch}.{tag}": self.model}


def ensure_lm(name: str) -> dict[str, Any]:
    """The LM's card (width, weights hash), building it first by running the recipe that publishes it when it is
    not in the store (once; not under torchrun, where the error names the command)."""
    from zoo.hub import read_card

    try:
        return _lm_card(name)
    except UnknownNameError:
        makers = recipes_publishing(name)
        if not makers:
            raise ConfigError(f"flame: cannot load the language model {name!r}: not in the zoo store, not a folder, "
                              "not an hf-hub: id; publish one (`zoo pretrain lm_llama_nano_scenes`) or name another "
                              "with --set method.lm=NAME") from None
        if dist_info()[1] > 1:
            raise ConfigError(f"flame: the language model {name!r} is missing; make it first with "
                              f"`zoo pretrain {makers[0]}`") from None
    from zoo.engine.trainer import data_root, pretrain

    run_dir = data_root().parent / "prerequisites" / makers[0]
    log.warning("flame: the language model %s is missing: training it once with `zoo pretrain %s` (run in %s)",
                name, makers[0], run_dir)
    pretrain(makers[0], run_dir=run_dir, resume=True)
    return read_card(name)


def _lm_card(name: str) -> dict[str, Any]:
    """What the recipe needs of an LM without loading its weights: `hidden_size` (and `weights_sha256` for a zoo
    LM), from its card, a transformers folder's config or a Hub repo's."""
    from zoo.hub import read_card, read_config

    if name.startswith("hf-hub:") or (Path(name).is_dir() and "arch" not in (read_config(Path(name)) or {})):
        from transformers import AutoConfig

        source = name.removeprefix("hf-hub:")
        repo, _, revision = source.partition("@")
        try:
            config = AutoConfig.from_pretrained(repo, revision=revision or None)
        except (OSError, ValueError) as e:
            raise UnknownNameError(f"{name}: no language model config there ({str(e).splitlines()[0]})") from None
        return {"hidden_size": int(config.hidden_size)}
    card = read_card(name)
    if "hidden_size" not in card:
        raise ConfigError(f"flame: {name!r} is a {card.get('arch')} model, not a language model")
    return card


RECIPES.register(
    "flame",
    Flame,
    family="flame",
    paper="arXiv:2411.11927",
    cpu_recipe="flame_vit_tiny_patch4_32_scenes",
    prerequisites=("lm_llama_nano_scenes",),  # publishes the CPU recipe's LM (built on demand outside tests too)
    description="FLAME: image tower + projector trained against a frozen LM's cached facet-prompt embeddings",
)

__all__ = ["Flame", "FacetSampler", "multi_positive_sigmoid_loss", "gather_texts", "ensure_lm", "BUILTIN_CAPTIONS"]
