"""Causal language models: `transformers` models as zoo architectures, with their tokenizer attached.

A zoo LM *is* a transformers `*ForCausalLM` (same object, `.config`, `forward(input_ids, attention_mask,
position_ids, output_hidden_states=...)`) carrying `tokenizer` (a transformers fast tokenizer) and zoo's
`zoo_arch` / `zoo_args`, so it publishes and loads by name like every zoo model; a published folder is also
a transformers folder (`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`).

- CPU scale, trained by `recipes/lm.py` on the built-in captions: `llama_nano` (4 blocks, width 128, ~1M
  parameters), `llama_tiny` (6 blocks, width 256, ~5M): Llama blocks (RMSNorm, RoPE, SwiGLU), untied embeddings.
- Real shapes, random weights (throughput, memory): `llama_1b` (Llama-3.2-1B) and `mistral_nemo_12b`
  (Mistral-NeMo-12B, FLAME's text encoder).

Any causal LM `transformers` knows loads with `load_causal_lm` (`zoo.load("hf-hub:ORG/LM")` or a local
folder goes through it): frozen parts run in eval mode, in bf16 where the device supports it.
transformers is imported only when an LM is built or loaded, never with zoo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from zoo.errors import ConfigError, DownloadError
from zoo.registry import MODELS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"  # what marks a folder that carries its tokenizer

# arch -> (transformers model_type, its config arguments). Untied input/output embeddings everywhere: a
# published safetensors file cannot hold one tensor under two names.
LM_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_nano": ("llama", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=512, vocab_size=1024)),
    "llama_tiny": ("llama", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=512, vocab_size=1024)),
    "llama_1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256,
                               rope_theta=500000.0)),
    "mistral_nemo_12b": ("mistral", dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                         max_position_embeddings=131072, vocab_size=131072, rope_theta=1000000.0)),
}


def lm_config(arch: str, **overrides: Any):
    """The transformers config of a registered LM architecture, with `overrides` (e.g. `vocab_size`)."""
    from transformers import AutoConfig

    model_type, args = LM_ARCHS[arch]
    return AutoConfig.for_model(model_type, **{**args, "tie_word_embeddings": False, **overrides})


def _lm_factory(arch: str):
    def build(**overrides: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = lm_config(arch, **overrides)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config)
        model.tokenizer = None  # a trained LM carries its own (published beside its weights)
        return model

    return build


def is_lm(model: nn.Module) -> bool:
    """A transformers causal LM (zoo's or foreign), without importing transformers for other models."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "get_output_embeddings")


# -- tokenizers -----------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (`tokenizers`) trained on `texts`, as a transformers fast tokenizer with
    <pad> <s> </s> <unk>; byte-level, so any text encodes. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   padding_side="left")


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in a published LM folder (`tokenizer.json` + `tokenizer_config.json`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return _left_padded(tok)


def _left_padded(tok):
    """Prompts end where their embedding is read: pad on the left, and give a tokenizer without a pad token one."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def save_lm_files(model: nn.Module, folder: Path) -> None:
    """The tokenizer files beside a published LM's weights (transformers' own names)."""
    if is_lm(model) and getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(str(folder))


def transformers_card(model: nn.Module) -> dict[str, Any] | None:
    """What transformers' `from_pretrained` reads of a published folder's config.json (model_type and the
    model's config) for a zoo LM; None for any other model."""
    if not is_lm(model) or getattr(model, "zoo_arch", None) not in LM_ARCHS:
        return None
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    return config


# -- loading by name -------------------------------------------------------------------------------------
LOADERS: list[Any] = []  # zoo.hub registers `load` here on import: models load an LM by name without importing upward


def load_frozen_lm(name: str) -> nn.Module:
    """`zoo.load(name)` as a frozen text encoder: no gradients, eval mode; a one-line error for a non-LM."""
    from zoo.errors import UnknownNameError

    try:
        model = LOADERS[0](name)  # importing zoo imports zoo.hub, which registers it
    except UnknownNameError as e:
        where = str(e).split(": ", 1)[-1].split(" (`zoo list`")[0]
        raise UnknownNameError(f"language model {name!r} not found ({where}); publish one (`zoo pretrain "
                               "lm_llama_nano_scenes`), or name a transformers folder or hf-hub:ORG/LM") from None
    if not is_lm(model):
        raise ConfigError(f"{name!r} is a {type(model).__name__}, not a causal language model; name a zoo LM "
                          "(`zoo list llama*`), a transformers folder or hf-hub:ORG/LM")
    return model.requires_grad_(False).eval()


# -- foreign LMs by name --------------------------------------------------------------------------------
def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16), float32 elsewhere (the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_transformers_config(cfg: Any) -> bool:
    """A config.json transformers wrote (model_type, no zoo arch)."""
    return isinstance(cfg, Mapping) and "model_type" in cfg and "arch" not in cfg


def load_causal_lm(source: str | Path, *, revision: str | None = None, dtype: torch.dtype | str | None = None,
                   where: str | None = None) -> nn.Module:
    """Any causal LM transformers can build (a local folder or a Hub repo id) with its tokenizer, eval mode,
    in `dtype` (default: bf16 on a GPU that has it, else float32); a one-line error naming where it looked."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = where or str(source)
    try:
        config = AutoConfig.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        raise DownloadError(f"{where}: no language model there (transformers looked for config.json in "
                            f"{'the folder' if Path(str(source)).exists() else 'the Hub repo and the local HF cache'}: "
                            f"{str(e).splitlines()[0]})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"{where}: a {config.model_type} model is not a causal language model "
                          "(AutoModelForCausalLM cannot build it); give a decoder LM such as Llama or Mistral")
    dtype = default_dtype() if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), revision=revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError) as e:
        raise DownloadError(f"{where}: transformers could not load it ({str(e).splitlines()[0]})") from None
    model.tokenizer = _left_padded(tokenizer)
    return model.eval()


for _arch, (_type, _args) in LM_ARCHS.items():
    MODELS.register(_arch, _lm_factory(_arch), family=_type, modality="text", defaults=dict(_args))

__all__ = ["LM_ARCHS", "lm_config", "is_lm", "train_tokenizer", "load_tokenizer",
           "save_lm_files", "load_frozen_lm", "LOADERS", "transformers_card", "default_dtype", "is_transformers_config", "load_causal_lm",
           "TOKENIZER_FILE"]
