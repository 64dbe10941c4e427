"""A small causal language model, pretrained on caption text: the frozen text encoder of FLAME at CPU scale.

No pretrained LM can be downloaded here, so zoo makes its own, the way a real LM is made: next-token
prediction (a transformers Llama-style `*ForCausalLM`, `zoo.models.lm`) over a text corpus, here the
built-in scenes' captions of every kind (exact, short, noisy alt-text, long descriptions), text only, no
image. Like the instruction data of a real LLM, a share of the corpus (`qa_fraction`) is FLAME's own
prompts answered in one word: a caption wrapped in a facet prompt (`zoo.models.flame.PROMPTS`) followed by
what the question asks about the scene, read from its metadata (the main object's shape and colour, the
minor object's, the background), so the hidden state at a prompt's `:"` has learnt to summarise the caption.
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


def corpus_texts(meta: Mapping[str, Any], rng: random.Random, qa_fraction: float, kinds: Sequence[str]) -> str:
    """One training text of a scene: a caption, or (with probability `qa_fraction`) a facet prompt on a caption
    followed by its one-word answer and the closing quote."""
    captions = meta["captions"]
    if rng.random() < qa_fraction:
        kind = rng.choice([k for k in PROMPT_FOR if k in captions])
        p = PROMPTS[PROMPT_FOR[kind]]
        head, pieces = p.texts(captions[kind])
        f = rng.randrange(len(pieces))
        return head + pieces[f] + scene_answers(meta)[f] + '"'
    return captions[rng.choice([k for k in kinds if k in captions])]


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
    """The per-sample transform (in the loader workers): one training text of the sample, tokenized."""

    def __init__(self, tokenizer: Any, max_length: int, qa_fraction: float, kinds: Sequence[str]):
        self.tokenizer, self.max_length, self.qa_fraction, self.kinds = tokenizer, max_length, qa_fraction, tuple(kinds)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = sample.get("meta")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("captions"), Mapping) or "objects" not in meta:
            raise SampleError("lm: a sample needs the built-in scenes' json (captions and objects)")
        rng = random.Random(int(torch.randint(0, 2**31, ())))  # from the worker's seeded torch stream
        text = corpus_texts(meta, rng, self.qa_fraction, self.kinds)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length - 2]
        ids = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        return {"input_ids": torch.tensor(ids, dtype=torch.long)}


def pad_right(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, and labels with -100 (ignored) on padding."""
    width = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for r, item in enumerate(items):
        ids[r, : len(item["input_ids"])] = item["input_ids"]
        mask[r, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_right(items, self.pad_id)


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
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      use_cache=False)
        return {"loss": out.loss, "tokens": batch["attention_mask"].sum().float()}

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

__all__ = ["CausalLM", "TextSampler", "builtin_corpus", "corpus_texts", "scene_answers", "pad_right"]
