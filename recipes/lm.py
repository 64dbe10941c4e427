"""A small causal language model, pretrained on caption text: the frozen text encoder of FLAME at CPU scale.

No pretrained LM can be downloaded here, so zoo makes its own, the way a real LM is made: next-token
prediction (a transformers Llama-style `*ForCausalLM`, `zoo.models.lm`) over a text corpus, here the
built-in scenes' captions of every kind (exact, short, noisy alt-text, long descriptions), text only, no
image. Like the instruction data of a real LLM, a share of the corpus (`qa_fraction`) is FLAME's own
prompts answered in one word: a caption wrapped in a facet prompt (`zoo.models.flame.PROMPTS`) with every
facet answered by what it asks about the scene, read from its metadata (the main object's shape and colour,
the minor object's, the background), so the hidden state at a prompt's `:"` has learnt to summarise the
caption. The facets of a text are packed as FLAME reads them (`pack`): each attends to the caption's prefix
and to itself, with the positions it has alone, so one text trains all of its answers.
The tokenizer is byte-level BPE trained on the same kind of text (`tokenizer_samples` scenes, seed 0).

Registered as `RECIPES["lm"]`; `export()` publishes the LM with its tokenizer (a transformers folder too).
"""

from __future__ import annotations

import functools
import random
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

import zoo
from zoo.errors import ConfigError, SampleError
from zoo.models.flame import PROMPTS
from zoo.recipes.base import DataSpec, Method
from zoo.registry import RECIPES

CAPTION_KINDS = ("exact", "short", "noisy", "long")
PROMPT_FOR = {"exact": "raw", "short": "short", "long": "long"}  # which prompt a caption kind is asked in


def scene_answers(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """One-word answers to FLAME's 7 facet questions (`FACETS`) about a built-in scene, from its metadata."""
    objects = meta["objects"]
    main = objects[0]
    minor = objects[1] if len(objects) > 1 else None
    return (main["shape"], main["shape"], main["color"], minor["shape"] if minor else "none",
            minor["color"] if minor else "none", "nothing", meta["background"])


def corpus_segments(meta: Mapping[str, Any], rng: random.Random, qa_fraction: float, kinds: Sequence[str]) -> list[str]:
    """One training text of a scene, as segments: [a caption], or (with probability `qa_fraction`) a facet prompt
    on a caption with ALL its facets answered: [prefix, facet 1 + answer + '"', ..., facet F + answer + '"'].
    The facets are packed as FLAME reads them (`pack`): each sees the prefix and itself, never another facet."""
    captions = meta["captions"]
    if rng.random() < qa_fraction:
        kind = rng.choice([k for k in PROMPT_FOR if k in captions])
        head, pieces = PROMPTS[PROMPT_FOR[kind]].texts(captions[kind])
        return [head, *(piece + answer + '"' for piece, answer in zip(pieces, scene_answers(meta)))]
    return [captions[rng.choice([k for k in kinds if k in captions])]]


def builtin_corpus(n: int, seed: int = 0) -> list[str]:
    """Every caption and every answered facet prompt of `n` built-in scenes: what the tokenizer is trained on."""
    from zoo.data.builtin import generate

    texts = []
    for s in generate("scenes", n, seed=seed, size=16):
        meta, answers = s["meta"], scene_answers(s["meta"])
        texts.extend(meta["captions"].values())
        for kind, p in PROMPT_FOR.items():
            head, pieces = PROMPTS[p].texts(meta["captions"][kind])
            texts.extend(head + piece + answers[f] + '"' for f, piece in enumerate(pieces))
    return texts


@functools.lru_cache(maxsize=4)
def builtin_tokenizer(samples: int, vocab_size: int):
    """The byte-level BPE of `builtin_corpus(samples)` (deterministic; built once per process)."""
    from zoo.models.lm import train_tokenizer

    return train_tokenizer(builtin_corpus(samples), vocab_size)


class TextSampler:
    """The per-sample transform (in the loader workers): one training text of the sample, tokenized by segment."""

    def __init__(self, tokenizer: Any, max_length: int, qa_fraction: float, kinds: Sequence[str]):
        self.tokenizer, self.max_length, self.qa_fraction, self.kinds = tokenizer, max_length, qa_fraction, tuple(kinds)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = sample.get("meta")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("captions"), Mapping) or "objects" not in meta:
            raise SampleError("lm: a sample needs the built-in scenes' json (captions and objects)")
        rng = random.Random(int(torch.randint(0, 2**31, ())))  # from the worker's seeded torch stream
        texts = corpus_segments(meta, rng, self.qa_fraction, self.kinds)
        tok = self.tokenizer
        pieces = [[tok.bos_token_id, *tok(texts[0], add_special_tokens=False)["input_ids"]]]
        pieces += [tok(t, add_special_tokens=False)["input_ids"] for t in texts[1:]]
        if len(texts) == 1:
            pieces[0].append(tok.eos_token_id)
        kept, room = [], self.max_length
        for piece in pieces:  # a text longer than max_length loses its last facets (or its tail)
            if room <= 0:
                break
            kept.append(piece[:room])
            room -= len(kept[-1])
        return {"input_ids": torch.tensor([i for piece in kept for i in piece], dtype=torch.long),
                "segments": torch.tensor([len(piece) for piece in kept], dtype=torch.long)}


def pack(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids; a (B, 1, L, L) mask where every facet segment sees the prefix (the first segment)
    and itself, causally, and nothing sees padding; position ids restarting after the prefix for every facet (as
    `zoo.models.flame.FacetTokenizer` lays them out); labels with -100 on padding and on each later facet's
    first token (the token before it belongs to another facet)."""
    width = max(len(i["input_ids"]) for i in items)
    b = len(items)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for r, item in enumerate(items):
        n = len(item["input_ids"])
        ids[r, :n] = labels[r, :n] = item["input_ids"]
        start, prefix = 0, int(item["segments"][0])
        for f, length in enumerate(item["segments"].tolist()):
            seg[r, start : start + length] = f
            pos[r, start : start + length] = torch.arange(length) + (prefix if f else 0)
            if f >= 2:
                labels[r, start] = -100
            start += length
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    mask = causal & (k >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(width, dtype=torch.bool) & (q < 0)  # padding rows see themselves: no NaN
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": pos, "labels": labels}


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pack(items, self.pad_id)


class CausalLM(Method):
    """Next-token prediction with a zoo LM architecture (`llama_nano`, ...) on caption text.

    `tokenizer`: "builtin" trains a byte-level BPE of `vocab_size` on `tokenizer_samples` built-in scenes;
    any other value is a tokenizer folder or Hub id transformers loads. `qa_fraction`: the share of texts
    that are answered facet prompts; `captions`: the caption kinds the plain texts are drawn from."""

    def __init__(self, arch: str = "llama_nano", tokenizer: str = "builtin", vocab_size: int = 1024,
                 tokenizer_samples: int = 1000, max_length: int = 256, qa_fraction: float = 0.5,
                 captions: Sequence[str] = CAPTION_KINDS, **arch_args: Any):
        super().__init__()
        if not 0.0 <= float(qa_fraction) <= 1.0:
            raise ConfigError(f"lm: qa_fraction must be in [0, 1], got {qa_fraction!r}")
        unknown = [c for c in captions if c not in CAPTION_KINDS]
        if unknown or not captions:
            raise ConfigError(f"lm: captions must be some of {', '.join(CAPTION_KINDS)}; got {list(captions)!r}")
        if tokenizer == "builtin":
            tok = builtin_tokenizer(int(tokenizer_samples), int(vocab_size))
        else:
            from zoo.models.lm import load_tokenizer

            tok = load_tokenizer(tokenizer)
        self.lm = zoo.create_model(arch, vocab_size=len(tok), **arch_args)
        self.lm.tokenizer = tok
        self.max_length, self.qa_fraction, self.captions = int(max_length), float(qa_fraction), tuple(captions)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
        return {"loss": out.loss, "tokens": (batch["labels"] >= 0).sum().float()}

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.lm.model.layers)

    def data_spec(self) -> DataSpec:
        tok = self.lm.tokenizer
        return DataSpec(fields=("meta",), transform=TextSampler(tok, self.max_length, self.qa_fraction, self.captions),
                        collate=_Collate(tok.pad_token_id))

    def backbone(self) -> nn.Module:
        return self.lm

    def export(self, name: str) -> dict[str, nn.Module]:
        return {name: self.lm}


RECIPES.register(
    "lm",
    CausalLM,
    family="lm",
    paper="Touvron et al. 2023 (Llama), as FLAME's frozen text encoder",
    cpu_recipe="lm_llama_nano_scenes",
    description="a small causal LM (transformers Llama) pretrained on built-in caption text: FLAME's frozen text encoder",
)

__all__ = ["CausalLM", "TextSampler", "builtin_corpus", "corpus_segments", "scene_answers", "pack"]
