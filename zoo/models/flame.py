"""FLAME (Cao et al., CVPR 2025, arXiv:2411.11927): a frozen causal LM as the text encoder of an image-text model.

Text side (no trainable parameter): a caption is wrapped in PromptEOL-style prompts that end in `means in just
one word:"`; the LM's penultimate-block hidden state at that last token is the caption's embedding. A long
caption gets 7 "facet" prompts, a short one 3, the raw alt-text 1 (`PROMPTS`). All facets of a caption run in
ONE forward pass under the facet-decoupled mask: every facet attends to the shared prefix (instruction and
caption) and to itself, never to another facet, so the pass computes what F separate calls would
(`FacetBatch`, `facet_embeddings`). Offline, every facet row is kept ([F, D], cached into the shards by
`zoo embed-text`); at evaluation the facets are averaged.

Image side (`FLAME`): a zoo ViT's tokens before any final norm, a per-token MLP projector into the LM's width
(Linear, GELU, Linear, LayerNorm), then the mean over the patch tokens (the projector runs before pooling).
The LM is not part of the model's weights: it is loaded by name on the first `encode_text`, so training
(on cached embeddings) never loads it and a published FLAME folder holds the image side only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.models.lm import load_frozen_lm
from zoo.registry import MODELS

# -- prompts (FLAME's templates; spec section 1.3) -----------------------------------------------------------
END = 'means in just one word:"'
FACETS = (
    f"this image description {END}",
    f"the category of the main object in this image {END}",
    f"the prominent characteristic or pattern of the main object in this image {END}",
    f"the category of the minor object in this image {END}",
    f"the prominent characteristic or pattern of the minor object in this image {END}",
    f"the primary action or event taking place in this image {END}",
    f"the overall atmosphere or emotion of this image {END}",
)
SEPARATOR = "<s>"  # the literal separator before the facets of a multi-facet prompt (the LM's BOS token)


@dataclass(frozen=True)
class Prompt:
    """One prompt kind: the prefix around the caption (it ends at the shared part's last token, the ","),
    and the facet texts that follow it."""

    name: str
    prefix: str
    facets: tuple[str, ...]

    def texts(self, caption: str) -> tuple[str, tuple[str, ...]]:
        """(prefix with the cleaned caption, the facet pieces as appended: a space, the separator before the
        first facet of a multi-facet prompt)."""
        head = self.prefix.format(clean_caption(caption))
        if len(self.facets) == 1:
            return head, (" " + self.facets[0],)
        return head, (f" {SEPARATOR} {self.facets[0]}", *(" " + f for f in self.facets[1:]))


_INSTRUCTION = 'Image description : "{}" . After thinking step by step ,'
PROMPTS: dict[str, Prompt] = {
    "raw": Prompt("raw", _INSTRUCTION, FACETS[:1]),  # alt-text, and zero-shot class prompts
    "short": Prompt("short", _INSTRUCTION, FACETS[:3]),
    "long": Prompt("long", "Detailed " + _INSTRUCTION, FACETS),
}
CACHE_LAYOUT = ("raw", "short", "long")  # the cached rows per sample: 1 + 3 + 7 = 11


def clean_caption(text: str) -> str:
    """FLAME's caption preprocessing: `"` -> `'`, a final `?` -> `.`, and a final `.` where the caption ends
    without `.?"'`."""
    text = " ".join(str(text).split()).replace('"', "'")
    if text.endswith("?"):
        text = text[:-1] + "."
    if not text.endswith((".", "?", '"', "'")):
        text += "."
    return text


def prompt(kind: str) -> Prompt:
    if kind not in PROMPTS:
        raise ConfigError(f"unknown FLAME prompt {kind!r}; valid: {', '.join(PROMPTS)}")
    return PROMPTS[kind]


# -- one pass for all facets ---------------------------------------------------------------------------------
class FacetBatch(dict):
    """A tokenized batch for `facet_embeddings`: input_ids (B, L), attention_mask (B, 1, L, L) bool (True: may
    attend), position_ids (B, L), facet_end (F,) the positions of each facet's last token (the same for every
    row: left padding aligns the facets, whose text is the same in every row)."""

    def to(self, device: torch.device | str) -> FacetBatch:
        return FacetBatch({k: v.to(device) for k, v in self.items()})


class FacetTokenizer:
    """texts -> `FacetBatch` for one prompt kind. `positions`: "restart" (default) puts every facet right after
    the shared prefix, the positions it has when run alone, so the pass equals separate calls exactly;
    "sequential" counts on through the earlier facets as FLAME's released code does (arange positions)."""

    def __init__(self, tokenizer: Any, kind: str = "raw", *, max_length: int | None = None,
                 positions: Literal["restart", "sequential"] = "restart"):
        if positions not in ("restart", "sequential"):
            raise ConfigError(f"positions must be 'restart' or 'sequential', got {positions!r}")
        self.tokenizer, self.prompt, self.positions = tokenizer, prompt(kind), positions
        self.max_length = max_length
        self.facet_ids = [self._ids(f) for f in self.prompt.texts("x")[1]]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_ids(self, caption: str) -> list[int]:
        """BOS, then the instruction and caption up to the shared part's end; the caption is cut so that the
        whole prompt fits `max_length` tokens."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = bos + self._ids(self.prompt.texts(caption)[0])
        if self.max_length is not None:
            room = self.max_length - sum(map(len, self.facet_ids))
            if room < len(bos) + 8:
                raise ConfigError(f"max_length {self.max_length} leaves no room for a caption beside the "
                                  f"{self.prompt.name} prompt's {sum(map(len, self.facet_ids))} facet tokens")
            if len(ids) > room:  # keep the prompt's closing words: cut inside the caption
                tail = self._ids(self.prompt.prefix.split("{}")[1])
                ids = ids[: room - len(tail)] + tail
        return ids

    def __call__(self, captions: Sequence[str] | str) -> FacetBatch:
        if isinstance(captions, str):
            captions = [captions]
        prefixes = [self.prefix_ids(c) for c in captions]
        n_facets = sum(map(len, self.facet_ids))
        width = max(map(len, prefixes)) + n_facets
        b = len(prefixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, width), pad, dtype=torch.long)
        real = torch.zeros(b, width, dtype=torch.bool)
        pos = torch.zeros(b, width, dtype=torch.long)
        facet_of = torch.full((width,), -1, dtype=torch.long)  # which facet a column belongs to (-1: prefix)
        start = width - n_facets
        ends, col = [], start
        for f, piece in enumerate(self.facet_ids):
            facet_of[col : col + len(piece)] = f
            col += len(piece)
            ends.append(col - 1)
        facet_ids = torch.tensor([i for piece in self.facet_ids for i in piece], dtype=torch.long)
        for r, p in enumerate(prefixes):
            ids[r, start - len(p) : start] = torch.tensor(p, dtype=torch.long)
            ids[r, start:] = facet_ids
            real[r, start - len(p) :] = True
            pos[r, start - len(p) : start] = torch.arange(len(p))
            if self.positions == "sequential":
                pos[r, start:] = len(p) + torch.arange(n_facets)
            else:
                offset = 0
                for piece in self.facet_ids:
                    pos[r, start + offset : start + offset + len(piece)] = len(p) + torch.arange(len(piece))
                    offset += len(piece)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        other_facet = (facet_of[:, None] >= 0) & (facet_of[None, :] >= 0) & (facet_of[:, None] != facet_of[None, :])
        allowed = causal & ~other_facet  # (L, L): a facet never sees an earlier one
        mask = allowed[None] & real[:, None, :]  # no query attends to padding
        mask |= torch.eye(width, dtype=torch.bool)[None] & ~real[:, :, None]  # padding rows see themselves (no NaN)
        return FacetBatch(input_ids=ids, attention_mask=mask[:, None], position_ids=pos,
                          facet_end=torch.tensor(ends, dtype=torch.long))


def default_layer(lm: nn.Module) -> int:
    """FLAME's layer: the output of the penultimate decoder block (`hidden_states[L - 1]` of L blocks, before
    the final norm; FLAME's config `"layer": "39"` of Mistral-NeMo's 40)."""
    return int(lm.config.num_hidden_layers) - 1


def facet_embeddings(lm: nn.Module, batch: FacetBatch, layer: int | None = None) -> torch.Tensor:
    """(B, F, D) float32, L2-normalised: the hidden state after block `layer` (1-based; default the penultimate)
    at each facet's last token, all facets in one forward pass."""
    layer = default_layer(lm) if layer is None else int(layer)
    if not 1 <= layer <= int(lm.config.num_hidden_layers):
        raise ConfigError(f"layer {layer} is out of range for a {lm.config.num_hidden_layers}-block LM; use 1.."
                          f"{lm.config.num_hidden_layers}")
    device = next(lm.parameters()).device
    batch = batch.to(device)
    mask = batch["attention_mask"]
    base = getattr(lm, "model", lm)  # the decoder without its LM head: no vocabulary-sized logits
    out = base(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
               output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[layer][:, batch["facet_end"]]
    return F.normalize(hidden.float(), dim=-1)


# -- the model ----------------------------------------------------------------------------------------------
class FLAME(nn.Module):
    """Image tower + per-token projector into a frozen LM's embedding space; text through the LM by name.

    `vision`: a zoo ViT arch (built with `global_pool="avg"`, so its tokens come without a final norm);
    `lm`: the name `zoo.load` takes for the text encoder; `embed_dim`: the LM's width; `mm_hidden`: the
    projector's hidden width (FLAME: max(embed_dim, 4096); default embed_dim); `layer`: the LM block whose
    output embeds a prompt (default the penultimate); logit scale/bias: SigLIP's init, t = 10, b = -10.
    """

    def __init__(self, vision: str = "vit_tiny_patch4_32", lm: str | None = None, embed_dim: int = 128,
                 mm_hidden: int | None = None, layer: int | None = None, max_length: int | None = None,
                 init_logit_scale: float = math.log(10), init_logit_bias: float = -10.0, **vision_args: Any):
        super().__init__()
        args = {"global_pool": "avg", "num_classes": 0, **vision_args}
        self.visual = MODELS.build(vision, **args)
        self.visual.zoo_arch, self.visual.zoo_args = vision, args  # publishable on its own, like any backbone
        if not hasattr(self.visual, "num_prefix_tokens"):
            raise ConfigError(f"FLAME's image tower must be a zoo ViT; {vision!r} is a {type(self.visual).__name__}")
        width, hidden = self.visual.embed_dim, int(mm_hidden or embed_dim)
        self.mm = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim), nn.LayerNorm(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.embed_dim, self.lm_name, self.layer, self.max_length = int(embed_dim), lm, layer, max_length
        self.pretrained_cfg = dict(self.visual.pretrained_cfg)
        self._lm: list[nn.Module] = []  # loaded on first use; a list keeps it out of the state dict

    # -- image -------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, embed_dim): the projector on every patch token, then their mean (FLAME: MLP before pooling)."""
        tokens = self.visual.forward_features(images)[:, self.visual.num_prefix_tokens :]
        emb = self.mm(tokens).mean(1)
        return F.normalize(emb, dim=-1) if normalize else emb

    # -- text --------------------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The frozen text encoder, loaded by name on first use, on the image tower's device."""
        if not self._lm:
            if self.lm_name is None:
                raise ConfigError("this FLAME model names no language model (lm=None); set one, e.g. "
                                  "FLAME(..., lm='llama_nano.scenes_captions')")
            lm = load_frozen_lm(self.lm_name)
            if int(lm.config.hidden_size) != self.embed_dim:
                raise ConfigError(f"language model {self.lm_name!r} has width {lm.config.hidden_size}, this FLAME "
                                  f"model embeds into {self.embed_dim}; use the LM it was trained with")
            self._lm.append(lm.to(self.logit_scale.device))
        return self._lm[0]

    def text_tokenizer(self, kind: str = "raw", **kw: Any) -> FacetTokenizer:
        """The prompt tokenizer for `kind` (raw: one prompt, zero-shot; short: 3 facets; long: 7 facets)."""
        return FacetTokenizer(self.lm.tokenizer, kind, max_length=kw.pop("max_length", self.max_length), **kw)

    @property
    def tokenizer(self) -> FacetTokenizer:
        """What `zoo.eval` calls: captions in the single raw prompt (FLAME's zero-shot and default inference)."""
        return self.text_tokenizer("raw")

    def encode_text(self, batch: FacetBatch, normalize: bool = False) -> torch.Tensor:
        """(B, embed_dim): the mean over the batch's facets of their normalised embeddings."""
        emb = facet_embeddings(self.lm, batch, self.layer).mean(1)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _apply(self, fn, recurse=True):  # .to(device) / .half() reach the LM too, once it is loaded
        super()._apply(fn, recurse)
        if self._lm:
            self._lm[0]._apply(fn, recurse)
        return self


def _flame_factory(vision: str, defaults: dict[str, Any]):
    def build(**overrides: Any) -> FLAME:
        return FLAME(vision, **{**defaults, **overrides})

    return build


# arch -> (image tower, defaults). FLAME-Mistral-NeMo-ViT-B-16 embeds into Mistral-NeMo's 5120 with a 5120-wide
# projector; the CPU archs into the zoo LMs' widths.
FLAME_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "flame_vit_nano_patch4_32": ("vit_nano_patch4_32", {"embed_dim": 128}),
    "flame_vit_tiny_patch4_32": ("vit_tiny_patch4_32", {"embed_dim": 128}),
    "flame_vit_base_patch16_224": ("vit_base_patch16_224", {"embed_dim": 5120, "mm_hidden": 5120}),
    "flame_vit_large_patch14_224": ("vit_large_patch16_224", {"embed_dim": 5120, "mm_hidden": 5120, "patch_size": 14}),
}
for _arch, (_vision, _defaults) in FLAME_ARCHS.items():
    MODELS.register(_arch, _flame_factory(_vision, _defaults), family="flame", modality="image-text", vision=_vision,
                    defaults=dict(_defaults), paper="arXiv:2411.11927")

__all__ = ["FLAME", "FLAME_ARCHS", "FacetBatch", "FacetTokenizer", "PROMPTS", "Prompt", "CACHE_LAYOUT", "FACETS",
           "clean_caption", "default_layer", "facet_embeddings", "prompt"]
