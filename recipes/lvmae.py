"""LV-MAE: masked-embedding autoencoders (Naiman et al. 2025, arXiv:2504.03501), as in amazon-science/lv-mae
`models_mae.py` and `data/CombinedData.py` (facts: specs/mae.md §3(f)).

What differs from MAE: the tokens are not image patches but a SEQUENCE OF FROZEN EMBEDDINGS (the paper's:
one LanguageBind embedding per 5-s video segment), computed once, offline, and L2-normalised. There is no patch
embedding: the encoder (`zoo.models.sequence`, e.g. `seq_tiny`) is as wide as the embeddings, with a class
token and a fixed 1-D sin-cos position embedding (zero row for the class token). MAE then runs unchanged in
shape: a `mask_ratio` of the tokens is removed (0.5, the README's value), the encoder sees the rest, the
decoder (512-d, 8 blocks, 16 heads in the paper; `decoder_pred` -> the embedding dimension, not pixels, and
1-D sin-cos positions) predicts every token, and the loss is taken on the removed tokens only, against the
input embeddings themselves (`norm_pix_loss`: each target standardised over its own dimensions, off by
default), as MSE or as 1 - cosine (`loss: cosine`, the official `--cos_loss`).

Masking (`masking`): `random` (MAE's per-sample uniform masking) or `importance`: each token is ranked by its
cosine similarity to the previous one and the LEAST similar (most changed) ones are kept, the redundant ones
removed; the first token is always kept (officially its score is 0, which keeps it first only while every
other similarity is positive; here it is -inf, so always). Both keep int(L * (1 - ratio)) of a sequence's L
real tokens (at least 1; officially sequences with fewer are re-drawn). Officially the dataset masks; here the
step does, on the device, as a pure function of (padding, ratio, noise) or (embeddings, padding, ratio).

Variable length: sequences are zero-padded to the batch's longest with a key-padding mask (True at padding) in
the encoder and the decoder; the loss mask is 0 on padding. Kept-token counts differ per sequence, so the
encoder gets the batch's largest count: a shorter sequence's spare slots hold padding tokens (masked keys).
The `mask` of a step's output is 1 on REMOVED REAL tokens only: exactly what the loss counts.

Data. Your own shards: each sample holds its (T, D) embeddings as `emb.npy` (the `field`), T <= the encoder's
`max_len`, optionally a `cls` label; `min_len` crops a random window of min_len..T tokens per sample (the
paper's random 10-1280 s windows); `embed_sequences` writes such shards from images. Built-in data (no
--data): each image becomes a sequence of crops scanned over it like video frames, embedded ONCE by a FROZEN
zoo backbone loaded by name (`embedder`, default the MAE-fractal ViT-Tiny published by
`mae_vit_tiny_patch4_32_fractals`) and cached under $ZOO_HOME/data keyed by what made them. Choices the
paper leaves open (it has videos, we have images): the images are generated at `image_size` (64 px) and
scanned by a `grid` x `grid` (3 x 3) raster of overlapping crops of `crop` (half) the side, stride a quarter
of the side, each resized to the embedder's input (32 px: the crops are at native resolution), WITHOUT the
whole image as a frame (`whole_image: true` puts it first), so the sequence model must integrate parts; each
crop is embedded by the embedder's class token after its final norm (`zoo.eval.features.pool`, 'cls'),
L2-normalised, and written with the sample's label (`cls`) so kNN can score the sequence features.

Evaluation: the engine's image evals cannot run on a sequence encoder (the CPU recipe has `eval.final: []`);
`sequence_features(model, shards_or_tensor)` gives class-token features for `zoo.eval.knn.knn_eval`, and
`sequence_knn(model, train, val)` does both (`builtin_sequences(split=...)` embeds the built-in splits).
Exported: the sequence encoder (`seq_tiny.lvmae_digits`), loadable by `zoo.load`.

Registered as `RECIPES["lvmae"]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.errors import ConfigError, SampleError, UnknownNameError, ZooError
from zoo.models.sequence import SequenceTransformer, sincos_pos_embed_1d
from zoo.recipes.base import DataSpec, Export, Method, check_vit_overrides, recipes_publishing
from zoo.recipes.mae import MAE, NORM_PIX_EPS, MAEDecoder, MaskedOutput, init_mae_weights, norm_pix_stats
from zoo.registry import MODELS, RECIPES

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "vit_tiny_patch4_32.mae_fractal"
INFO_KEY = "lvmae"  # what made embedded shards, in their dataset.json
CACHE_VERSION = 1  # bump when the embedding of built-in data changes: cached shards are then made afresh


# -- pure pieces ---------------------------------------------------------------------------------------
def pad_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, D) sequences -> (emb (B, T_max, D) zero-padded at the end, padding (B, T_max) bool, True at padding)."""
    if not seqs:
        raise ZooError("pad_sequences needs at least one sequence")
    longest = max(s.shape[0] for s in seqs)
    emb = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[-1])
    padding = torch.ones(len(seqs), longest, dtype=torch.bool)
    for i, s in enumerate(seqs):
        emb[i, : s.shape[0]] = s
        padding[i, : s.shape[0]] = False
    return emb, padding


def keep_counts(padding: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept per sequence: int(L * (1 - ratio)) of its L real tokens, at least 1 (LV-MAE's `len_keep`)."""
    if not 0.0 <= ratio < 1.0:
        raise ZooError(f"mask ratio must be in [0, 1), got {ratio}")
    lengths = (~padding).sum(1)
    return torch.floor(lengths.double() * (1 - ratio)).long().clamp(min=1).minimum(lengths)


def masking_from_scores(scores: torch.Tensor, padding: torch.Tensor,
                        ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each sequence's `keep_counts` real tokens of LOWEST score; the masking both strategies share.

    Returns MAE's triple: `ids_keep` (B, K), K the batch's largest count (a shorter count's spare slots hold
    padding tokens, which the key-padding mask hides); `ids_restore` (B, N), the inverse of the shuffle (kept
    real tokens, then padding, then removed real tokens); `mask` (B, N) float, 1 = a REMOVED REAL token (the
    loss mask: 0 on kept tokens and on padding), in the original order."""
    b, n = scores.shape
    padding = padding.bool()
    real = ~padding
    keep = keep_counts(padding, ratio)
    rank = torch.argsort(torch.argsort(scores.float().masked_fill(padding, float("inf")), dim=1, stable=True), dim=1)
    kept_real = real & (rank < keep[:, None])
    group = torch.where(kept_real, 0, torch.where(padding, 1, 2))
    ids_shuffle = torch.argsort(group * n + rank, dim=1)  # distinct keys: a deterministic order
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, : int(keep.max())]
    visible = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter(1, ids_keep, True)
    return ids_keep, ids_restore, (real & ~visible).float()


def random_sequence_masking(
    padding: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's uniform masking per sequence, over its real tokens only: one `torch.rand(B, N)` draw."""
    noise = torch.rand(padding.shape, generator=generator, device=padding.device)
    return masking_from_scores(noise, padding, ratio)


def importance_scores(emb: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N): each token's cosine similarity to the previous one (high = redundant); the first token -inf."""
    sim = F.cosine_similarity(emb[:, 1:].float(), emb[:, :-1].float(), dim=-1)
    first = sim.new_full((emb.shape[0], 1), float("-inf"))
    scores = torch.cat([first, sim], dim=1)
    return scores if padding is None else scores.masked_fill(padding.bool(), float("inf"))


def importance_masking(emb: torch.Tensor, padding: torch.Tensor,
                       ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LV-MAE's importance masking: keep the tokens that changed most from their predecessor (least cosine
    similarity) and the first one, remove the redundant ones. Deterministic: no random draw."""
    return masking_from_scores(importance_scores(emb, padding), padding, ratio)


def embedding_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   loss: Literal["mse", "cosine"] = "mse", norm: bool = False) -> torch.Tensor:
    """Per-token MSE (mean over the dimensions) or 1 - cosine, averaged over the tokens where `mask` is 1 (removed
    real tokens; 0 when there are none). `norm`: each target standardised by its own mean and unbiased variance
    (LV-MAE's `norm_pix_loss`). In float32 whatever the autocast dtype."""
    target = target.float()
    if norm:
        mean, var = norm_pix_stats(target)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    if loss == "mse":
        per_token = (pred.float() - target).pow(2).mean(dim=-1)
    elif loss == "cosine":
        per_token = 1 - F.cosine_similarity(pred.float(), target, dim=-1, eps=1e-6)
    else:
        raise ConfigError(f"lvmae: loss must be 'mse' or 'cosine', got {loss!r}")
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def crop_boxes(size: int, grid: int = 3, crop: float = 0.5) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of a `grid` x `grid` raster of square crops of `crop` * `size`, evenly spaced
    from edge to edge (3 x 3 halves: stride a quarter of the side, neighbours overlap by half), row by row."""
    side = max(1, round(size * crop))
    steps = [round(i * (size - side) / (grid - 1)) for i in range(grid)] if grid > 1 else [(size - side) // 2]
    return [(x, y, x + side, y + side) for y in steps for x in steps]


def scan_crops(image: Image.Image, grid: int = 3, crop: float = 0.5, whole_image: bool = False) -> list[Image.Image]:
    """An image as a sequence of frames: (the whole image first, with `whole_image`, then) the `crop_boxes` crops."""
    if image.width != image.height:
        raise ZooError(f"lvmae: crops are scanned over square images, got {image.width}x{image.height}")
    frames = [image] if whole_image else []
    return frames + [image.crop(box) for box in crop_boxes(image.width, grid, crop)]


def frames_tensor(frames: Sequence[Image.Image], pretrained_cfg: dict[str, Any]) -> torch.Tensor:
    """Frames resized (bicubic) to the embedder's input and normalised with its mean/std: (T, C, H, W)."""
    c, h, w = pretrained_cfg["input_size"]
    mode = "RGB" if c == 3 else "L"
    arrays = [np.asarray(f.convert(mode).resize((w, h), Image.BICUBIC), dtype=np.float32).reshape(h, w, c)
              for f in frames]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(pretrained_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pretrained_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


# -- data ----------------------------------------------------------------------------------------------
class SequenceSample:
    """The per-sample transform (loader workers): the `field` array (T, D) as float32 `emb`, checked against the
    encoder (width, max_len), optionally a random window of min_len..T tokens; the `label` when present."""

    def __init__(self, field: str = "emb", width: int | None = None, max_len: int | None = None,
                 min_len: int | None = None, recipe: str = "lvmae"):
        self.field, self.width, self.max_len, self.min_len, self.recipe = field, width, max_len, min_len, recipe

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{self.recipe}: sample {sample.get('__key__')} ({sample.get('__url__')})"
        if self.field not in sample:
            raise SampleError(f"{where} has no {self.field}.npy member; {MAKE_HINT}")
        emb = torch.as_tensor(np.asarray(sample[self.field]), dtype=torch.float32)
        check_sequence_shape(tuple(emb.shape), self.field, self.width, self.max_len, where, SampleError)
        t = emb.shape[0]
        if self.min_len is not None and t > self.min_len:
            length = int(torch.randint(self.min_len, t + 1, ()).item())
            start = int(torch.randint(0, t - length + 1, ()).item())
            emb = emb[start : start + length]
        out = {"emb": emb}
        if "label" in sample:
            out["label"] = int(sample["label"])
        return out


MAKE_HINT = ("each sample needs its (T, D) embeddings as that member: write them with "
             "`zoo.recipes.lvmae.embed_sequences(EMBEDDER, SHARDS, OUT)` (frames of images through a frozen zoo "
             "backbone), or train on the built-in data without --data")


def check_sequence_shape(shape: tuple[int, ...], field: str, width: int | None, max_len: int | None, where: str,
                         error: type[ZooError] = ZooError) -> None:
    """One-line errors for an embedding array the encoder cannot take."""
    if len(shape) != 2 or shape[0] < 1:
        raise error(f"{where}: {field}.npy is {shape}, not a (T, D) sequence of at least one embedding")
    if width is not None and shape[1] != width:
        raise error(f"{where}: {field}.npy holds {shape[1]}-d embeddings but the encoder is {width} wide; set "
                    f"model.embed_dim: {shape[1]} (the encoder's width is the embeddings' dimension)")
    if max_len is not None and shape[0] > max_len:
        raise error(f"{where}: a sequence of {shape[0]} embeddings is longer than the encoder's max_len={max_len}; "
                    f"set model.max_len: {shape[0]} (or more), or shorten the sequences")


def collate_sequences(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: `emb` (B, T_max, D) zero-padded, `padding` (B, T_max) True at padding, `label` when every sample
    has one, and the engine's `__key__`s."""
    emb, padding = pad_sequences([s["emb"] for s in samples])
    out: dict[str, Any] = {"emb": emb, "padding": padding}
    if all("label" in s for s in samples):
        out["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if all("__key__" in s for s in samples):
        out["__key__"] = [s["__key__"] for s in samples]
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60]


def load_embedder(name: str, recipe: str = "lvmae") -> nn.Module:
    """The frozen embedder by name (eval mode, no gradients); a one-line error naming the recipe that publishes it."""
    try:
        model = zoo.load(name)
    except UnknownNameError as e:
        makers = recipes_publishing(name)
        hint = (f"; make it with `zoo pretrain {makers[0]}`" if makers
                else "; name another with --set method.embedder=NAME")
        raise ConfigError(f"{recipe}: cannot load the embedder {name!r}{hint} ({e})") from None
    return model.requires_grad_(False).eval()


@torch.no_grad()
def embed_sequences(embedder: str | nn.Module, shards: str | Sequence[str], out: str | Path, *, grid: int = 3,
                    crop: float = 0.5, whole_image: bool = False, field: str = "emb", batch_size: int = 64,
                    device: str | torch.device | None = None, info: dict[str, Any] | None = None) -> str:
    """Write image shards as sequence shards in `out` (whole or not at all): per sample its `scan_crops` frames
    embedded by the frozen `embedder` (class token after the final norm), L2-normalised, as `FIELD.npy` (T, D)
    float32, with its label (`cls`) and key. Returns the shard pattern."""
    from zoo.data import dataset_size
    from zoo.data.fields import FieldError
    from zoo.data.reader import decode_sample, iter_raw_samples
    from zoo.data.shards import expand_sources
    from zoo.data.writer import write_shards
    from zoo.eval.features import pool

    model = load_embedder(embedder) if isinstance(embedder, str) else embedder.eval()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was = next(model.parameters()).device
    model.to(device)
    urls = [u for source in expand_sources(list(shards) if not isinstance(shards, str) else shards) for u in source]
    n = dataset_size(urls, scan=True) or 0
    counts: Counter = Counter()
    cfg = model.pretrained_cfg

    def embed(batch: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        frames = [frames_tensor(scan_crops(s["image"], grid, crop, whole_image), cfg) for s in batch]
        x = torch.cat(frames).to(device)
        feats = F.normalize(pool(model, x, ("cls",))["cls"].float(), dim=-1).cpu()
        for s, f in zip(batch, feats.split([len(fr) for fr in frames])):
            row = {"__key__": s["__key__"], field: f.numpy()}
            if "label" in s:
                row["label"] = int(s["label"])
            yield row

    def samples() -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for raw in iter_raw_samples(urls, counts):
            try:
                batch.append(decode_sample(raw, ("image",), ("label",)))
            except FieldError as e:
                counts[e.reason] += 1
                continue
            if len(batch) == batch_size:
                yield from embed(batch)
                batch = []
        if batch:
            yield from embed(batch)

    out = Path(out)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    source_info = _dataset_info(urls)
    meta = {**{k: v for k, v in source_info.items() if k in ("name", "split", "num_classes", "classes", "size")},
            INFO_KEY: {"embedder": embedder if isinstance(embedder, str) else getattr(embedder, "zoo_arch", None),
                       "field": field, "grid": grid, "crop": crop, "whole_image": whole_image,
                       "frames": grid * grid + int(whole_image), "dim": int(model.num_features), **(info or {})}}
    try:
        write_shards(samples(), tmp, maxcount=max(1, min(1000, -(-n // 8))), total=n, info=meta,
                     desc="lvmae: embedding crops")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.to(was)
    if counts:
        log.warning("lvmae: samples skipped while embedding: %s", dict(counts))
    return str(out / "*.tar")


def _dataset_info(urls: Sequence[str]) -> dict[str, Any]:
    for folder in {Path(u).parent for u in urls}:
        info = folder / "dataset.json"
        if info.is_file():
            try:
                return json.loads(info.read_text())
            except json.JSONDecodeError:
                pass
    return {}


def embedded_sequences(embedder: str, shards: str | Sequence[str], *, grid: int = 3, crop: float = 0.5,
                       whole_image: bool = False, field: str = "emb", batch_size: int = 64,
                       width: int | None = None, recipe: str = "lvmae") -> str:
    """`embed_sequences` of image shards once, cached under $ZOO_HOME/data by (embedder and its weights, crops,
    field, source folder); later calls return the cached pattern. `width`: the encoder's, checked first."""
    from zoo.data.shards import expand_sources
    from zoo.engine.trainer import data_root
    from zoo.hub import read_card

    urls = [u for source in expand_sources(list(shards) if not isinstance(shards, str) else shards) for u in source]
    try:
        sha = read_card(embedder).get("weights_sha256")
    except UnknownNameError:
        sha = None  # load_embedder below says what to do
    key = json.dumps([embedder, sha, grid, crop, whole_image, field, CACHE_VERSION], sort_keys=True)
    folder = Path(urls[0]).parent
    out = data_root() / f"{folder.name}.{INFO_KEY}-{_slug(embedder)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if (out / "dataset.json").is_file():
        return str(out / "*.tar")
    with torch.random.fork_rng(devices=[]):  # building the embedder draws a random init: not from training's stream
        model = load_embedder(embedder, recipe)
        if width is not None and model.num_features != width:
            raise ConfigError(f"{recipe}: the embedder {embedder!r} gives {model.num_features}-d features but the "
                              f"encoder is {width} wide; set model.embed_dim: {model.num_features}")
        log.info("%s: embedding %s into %s with the frozen %s (once)", recipe, folder, out, embedder)
        return embed_sequences(model, urls, out, grid=grid, crop=crop, whole_image=whole_image, field=field,
                               batch_size=batch_size, info={"embedder": embedder, "weights_sha256": sha})


def builtin_sequences(split: str = "train", name: str = "digits", n: int = 2000, *,
                      embedder: str = DEFAULT_EMBEDDER, image_size: int = 64, grid: int = 3, crop: float = 0.5,
                      whole_image: bool = False, field: str = "emb", batch_size: int = 64) -> str:
    """The built-in data set `name`/`split` (generated at `image_size`) as cached embedded sequences, the way the
    recipe trains on it (e.g. the val split for a kNN of `sequence_features`): a shard pattern."""
    from zoo.data.builtin import resolve_source
    from zoo.engine.trainer import data_root

    images = resolve_source(f"builtin:{name}", split=split, root=data_root(), size=image_size, n=n)
    return embedded_sequences(embedder, images, grid=grid, crop=crop, whole_image=whole_image, field=field,
                              batch_size=batch_size)


def check_sequences(urls: Sequence[str], field: str, width: int, max_len: int, recipe: str = "lvmae") -> None:
    """Refuse shards whose first sample lacks the `FIELD.npy` member or whose array the encoder cannot take."""
    from zoo.data.fields import decode_field, field_of
    from zoo.data.reader import iter_raw_samples

    for raw in iter_raw_samples(list(urls[:1]), Counter()):
        member = next((ext for ext in raw if not ext.startswith("__") and field_of(ext) == field), None)
        if member is None:
            have = sorted(ext for ext in raw if not ext.startswith("__"))
            raise ZooError(f"{recipe}: {urls[0]}: samples have no {field}.npy member (they have {have}); {MAKE_HINT}")
        value = decode_field(field, member, raw[member])
        check_sequence_shape(tuple(np.shape(value)), field, width, max_len, f"{recipe}: {urls[0]}")
        return
    raise ZooError(f"{recipe}: {urls[0] if urls else 'the data'}: no samples to check")


# -- features for kNN --------------------------------------------------------------------------------
@torch.no_grad()
def sequence_features(model: nn.Module | None, data: torch.Tensor | str | Sequence[str], *,
                      padding: torch.Tensor | None = None, field: str = "emb", batch_size: int = 256,
                      num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (N, D), labels (N,) or None): the class token of `model` (eval mode) over embedded sequences, a
    (B, T, D) tensor (with its `padding` (B, T), True at padding) or shards with `FIELD.npy` (+ `cls` labels).
    `model=None`: the mean of each sequence's embeddings, the baseline without a sequence model."""

    def features(emb: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        if model is None:
            real = (~pad).unsqueeze(-1).float() if pad is not None else torch.ones_like(emb[..., :1])
            return (emb * real).sum(1) / real.sum(1)
        device = next(model.parameters()).device
        pad = None if pad is None else pad.to(device)
        return model.forward_head(model.forward_features(emb.to(device), key_padding_mask=pad), pre_logits=True).float()

    if model is not None:
        model.eval()
    if torch.is_tensor(data):
        return features(data.float(), padding).cpu(), None
    from zoo.data import loader

    width = getattr(model, "embed_dim", None)
    transform = SequenceSample(field, width, getattr(model, "max_len", None))
    batches = loader(data, fields=(field,), optional_fields=("label",), transform=transform,
                     collate=collate_sequences, batch_size=batch_size, num_workers=num_workers, shuffle=0)
    feats, labels = [], []
    for batch in batches:
        feats.append(features(batch["emb"], batch["padding"]).cpu())
        if "label" in batch:
            labels.append(batch["label"])
    if not feats:
        raise ZooError(f"no samples with {field}.npy in {data}")
    return torch.cat(feats), (torch.cat(labels) if len(labels) == len(feats) else None)


def sequence_knn(model: nn.Module | None, train: str | Sequence[str], val: str | Sequence[str], *,
                 ks: Sequence[int] = (10, 20), temperature: float = 0.07, field: str = "emb") -> dict[str, float]:
    """Weighted kNN (`zoo.eval.knn.knn_eval`, top-1 % per k) of `sequence_features` from labelled sequence shards."""
    from zoo.eval.knn import knn_eval

    xtr, ytr = sequence_features(model, train, field=field)
    xva, yva = sequence_features(model, val, field=field)
    if ytr is None or yva is None:
        raise ZooError("sequence_knn needs labelled shards (a `cls` member per sample)")
    return knn_eval(xtr, ytr, xva, yva, ks=ks, temperature=temperature)


# -- decoder -----------------------------------------------------------------------------------------
class SequenceDecoder(MAEDecoder):
    """MAE's decoder over a 1-D sequence: 1-D sin-cos positions, a key-padding mask, `decoder_pred` -> the
    embedding dimension. Parameter names are LV-MAE's (= models_mae's)."""

    def __init__(self, max_len: int, embed_dim: int, decoder_dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__((1, max_len), embed_dim, decoder_dim, depth, num_heads, patch_size=1, in_chans=embed_dim,
                         mlp_ratio=mlp_ratio)
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_1d(decoder_dim, max_len))

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """latent (B, 1 + K, D) class token first, ids_restore (B, N), padding (B, N) -> pred (B, N, D)."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: kept first, then removed
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed[:, : n + 1].to(x.dtype)
        attn_mask = SequenceTransformer.attention_mask(padding)
        for blk in self.decoder_blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# -- the method --------------------------------------------------------------------------------------
@dataclass
class Sequences:
    """What LV-MAE masks: embeddings (B, T, D) and their padding (B, T), True at padding."""

    emb: torch.Tensor
    padding: torch.Tensor


class LVMAE(MAE):
    """LV-MAE on embedding sequences; exports the sequence encoder (`arch`, a `zoo.models.sequence` arch).

    MAE's step and hooks, over `Sequences`: `tokenize` adds 1-D positions (no patch embedding), `sample_mask`
    masks real tokens only (random or importance), `encode`/`decode` run under the key-padding mask,
    `targets` are the input embeddings, `reconstruction_loss` is MSE or 1 - cosine on removed real tokens."""

    recipe = "lvmae"

    def __init__(
        self,
        arch: str = "seq_tiny",
        mask_ratio: float = 0.5,
        masking: str = "random",
        loss: str = "mse",
        norm_pix_loss: bool = False,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        field: str = "emb",
        min_len: int | None = None,
        embedder: str = DEFAULT_EMBEDDER,
        image_size: int = 64,
        grid: int = 3,
        crop: float = 0.5,
        whole_image: bool = False,
        embed_batch_size: int = 64,
        **arch_overrides: Any,
    ):
        Method.__init__(self)  # not MAE.__init__, which builds a ViT; everything else of MAE is used as is
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"{self.recipe}: mask_ratio must be in (0, 1), got {mask_ratio}")
        if masking not in ("random", "importance"):
            raise ConfigError(f"{self.recipe}: masking must be 'random' or 'importance', got {masking!r}")
        if loss not in ("mse", "cosine"):
            raise ConfigError(f"{self.recipe}: loss must be 'mse' or 'cosine', got {loss!r}")
        if MODELS.get(arch).meta.get("family") != "sequence":
            raise ConfigError(f"{self.recipe}: {arch!r} is not a sequence encoder; LV-MAE encodes embedding sequences "
                              f"with one of {', '.join(MODELS.names('seq_*'))}")
        if min_len is not None and min_len < 1:
            raise ConfigError(f"{self.recipe}: min_len must be at least 1 (or null: whole sequences), got {min_len}")
        if grid < 1 or not 0.0 < crop <= 1.0:
            raise ConfigError(f"{self.recipe}: grid must be >= 1 and crop in (0, 1], got grid={grid}, crop={crop}")
        check_vit_overrides(LVMAE, self.recipe, arch_overrides, model=SequenceTransformer, model_name="sequence encoder")
        self.arch = arch
        self.mask_ratio = float(mask_ratio)
        self.masking, self.loss, self.norm_pix_loss = masking, loss, bool(norm_pix_loss)
        self.field, self.min_len = field, min_len
        self.embedder, self.image_size, self.grid, self.crop = embedder, int(image_size), int(grid), float(crop)
        self.whole_image, self.embed_batch_size = bool(whole_image), int(embed_batch_size)
        self.encoder = zoo.create_model(arch, **arch_overrides)
        self.decoder = self.build_decoder(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio)
        self.loss_weights: dict[str, float] = {"rec": 1.0}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LV-MAE's init (MAE's): xavier Linear, LN 1/0, class and mask tokens N(0, 0.02)."""
        self.apply(init_mae_weights)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def build_decoder(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
        return SequenceDecoder(self.encoder.max_len, self.encoder.embed_dim, dim, depth, heads, mlp_ratio)

    # -- the hooks ---------------------------------------------------------------------------------
    def inputs(self, batch: dict[str, Any]) -> Sequences:
        return Sequences(batch["emb"].float(), batch["padding"].bool())

    def tokenize(self, x: Sequences) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embeddings + 1-D positions (B, T, D); the 'grid' of a sequence is (1, T)."""
        return self.encoder.seq_tokens(x.emb), (1, x.emb.shape[1])

    def sample_mask(self, B: int, N: int, ratio: float, device: torch.device, generator: torch.Generator | None = None,
                    x: Sequences | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`random_sequence_masking` or `importance_masking` of the real tokens of `x` (no padding without x);
        the mask is 1 on removed real tokens only."""
        padding = x.padding if x is not None else torch.zeros(B, N, dtype=torch.bool, device=device)
        if self.masking == "importance":
            if x is None:
                raise ZooError("lvmae: importance masking ranks the embeddings themselves; pass x=")
            return importance_masking(x.emb, padding, ratio)
        return random_sequence_masking(padding, ratio, generator)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.forward_tokens(tokens, keep=ids_keep, key_padding_mask=padding)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int],
               padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(latent, ids_restore, padding)

    def targets(self, x: Sequences) -> torch.Tensor:
        """The input embeddings themselves (standardised in the loss with `norm_pix_loss`)."""
        return x.emb

    def reconstruction_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return embedding_loss(pred, target, mask, self.loss, self.norm_pix_loss)

    def forward_masked(self, x: Sequences, mask_ratio: float | None = None,
                       generator: torch.Generator | None = None) -> MaskedOutput:
        """MAE's order of hooks, with the padding passed to the masking, the encoder and the decoder."""
        tokens, grid = self.tokenize(x)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, ids_restore, mask = self.sample_mask(*tokens.shape[:2], ratio, tokens.device, generator, x=x)
        latent = self.encode(tokens, ids_keep, x.padding)
        return MaskedOutput(latent, self.decode(latent, ids_restore, grid, x.padding), mask, ids_restore, grid)

    def forward_encoder(self, x: Sequences, mask_ratio: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, _ = self.tokenize(x)
        ids_keep, ids_restore, mask = self.sample_mask(*tokens.shape[:2], mask_ratio, tokens.device, generator, x=x)
        return self.encode(tokens, ids_keep, x.padding), mask, ids_restore

    # -- data ----------------------------------------------------------------------------------------
    def prepare_shards(self, shards: str, builtin: bool) -> str:
        """Built-in images: embedded once into cached sequence shards (`embedded_sequences`); your shards: checked
        for the embedding member and its shape."""
        from zoo.data.shards import expand_sources

        if builtin:
            urls = [u for source in expand_sources(shards) for u in source]
            shards = embedded_sequences(self.embedder, urls, grid=self.grid, crop=self.crop,
                                        whole_image=self.whole_image, field=self.field,
                                        batch_size=self.embed_batch_size, width=self.encoder.embed_dim,
                                        recipe=self.recipe)
        for source in expand_sources(shards):
            check_sequences(source, self.field, self.encoder.embed_dim, self.encoder.max_len, self.recipe)
        return shards

    def data_spec(self) -> DataSpec:
        transform = SequenceSample(self.field, self.encoder.embed_dim, self.encoder.max_len, self.min_len, self.recipe)
        return DataSpec(fields=(self.field,), optional_fields=("label",), transform=transform,
                        collate=collate_sequences, prepare=self.prepare_shards, builtin_size=self.image_size)

    # -- models and pictures ------------------------------------------------------------------------
    def export(self, name: str) -> dict[str, Export]:
        """The sequence encoder; its card says what it reads."""
        card = {"input": "embedding sequences (B, T, D) with key_padding_mask (B, T), True at padding",
                "builtin_embedder": self.embedder,
                "builtin_frames": f"{self.grid}x{self.grid} crops of {self.crop} the side of {self.image_size}px images"
                                  + (", whole image first" if self.whole_image else "")}
        return {name: Export(self.encoder, card)}

    def draw(self, batch: dict[str, Any], folder: Path) -> list[Path]:
        """plots/reconstruction.png: per sequence (8), its mask (white: removed, grey: kept, black: padding) and the
        cosine of each token's prediction with its embedding (black -1 .. white 1)."""
        from zoo.engine.plots import image_grid

        x = self.inputs(batch)
        x = Sequences(x.emb[:8], x.padding[:8])
        out = self.forward_masked(x, generator=torch.Generator(device=x.emb.device).manual_seed(0))
        cos = (F.cosine_similarity(out.pred.float(), x.emb.float(), dim=-1) + 1) / 2
        mask = torch.where(x.padding, 0.0, 0.5 + 0.5 * out.mask)
        rows = [r.masked_fill(x.padding, 0.0)[:, None, None, :].float().cpu() for r in (mask, cos)]
        return [image_grid(rows, folder / "reconstruction.png", mean=(0.0,), std=(1.0,), scale=12,
                           row_labels=["mask", "cos(pred, emb)"])]


RECIPES.register(
    "lvmae",
    LVMAE,
    family="mae",
    paper="arXiv:2504.03501",
    cpu_recipe="lvmae_seq_tiny_digits",
    prerequisites=("mae_vit_tiny_patch4_32_fractals",),  # publishes the CPU recipe's frozen embedder
    description="LV-MAE: MAE over sequences of frozen embeddings (crops/segments), reconstructing the masked "
                "embeddings (MSE or cosine), random or importance masking, padded variable lengths",
)

__all__ = [
    "LVMAE",
    "Sequences",
    "SequenceDecoder",
    "SequenceSample",
    "pad_sequences",
    "keep_counts",
    "masking_from_scores",
    "random_sequence_masking",
    "importance_scores",
    "importance_masking",
    "embedding_loss",
    "crop_boxes",
    "scan_crops",
    "frames_tensor",
    "collate_sequences",
    "embed_sequences",
    "embedded_sequences",
    "builtin_sequences",
    "check_sequences",
    "sequence_features",
    "sequence_knn",
    "DEFAULT_EMBEDDER",
]
