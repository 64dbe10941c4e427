"""Image-text retrieval: Recall@K both ways, where an image may have several captions.

image->text: an image counts as retrieved at K when ANY of its texts is among its K most similar
texts; text->image: when its one image is among its K most similar images. Ties count against the
model (a constant embedding scores no better than chance, never 100%). Similarities are computed in
blocks of `chunk` x `chunk`, so memory stays bounded for any number of images and texts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.transforms import named_captions
from zoo.errors import SampleError, ZooError
from zoo.eval.zeroshot import _EvalMode, default_transform, encode_images, encode_texts, require_image_text
from zoo.progress import progress

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ZooError(
            f"retrieval needs 2-D embeddings of one width, got images {tuple(image_emb.shape)} "
            f"and texts {tuple(text_emb.shape)}"
        )
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ZooError("retrieval needs at least one image and one text; the data is empty")
    if text_to_image.ndim != 1 or len(text_to_image) != len(text_emb):
        raise ZooError(
            f"text_to_image must give one image index per text: {len(text_emb)} texts, shape {tuple(text_to_image.shape)}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= len(image_emb):
        raise ZooError(
            f"text_to_image holds image indices {int(text_to_image.min())}..{int(text_to_image.max())} "
            f"but there are {len(image_emb)} images; index text j's image as 0..{len(image_emb) - 1}"
        )
    for what, emb in (("image", image_emb), ("text", text_emb)):
        if not torch.isfinite(emb).all():
            raise ZooError(f"the {what} embeddings contain NaN or inf: the model diverged or overflowed (try float32)")


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, *, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image->text ranks (N_img,), text->image ranks (N_txt,)), 0 = first.

    An image's rank is the number of other images' texts scoring at least its best own text; a
    text's rank the number of other images scoring at least its own. Images without a text get
    rank N_txt. Embeddings are L2-normalised here; peak extra memory is ~ chunk x chunk floats."""
    text_to_image = torch.as_tensor(text_to_image)
    _check(image_emb, text_emb, text_to_image)
    if chunk < 1:
        raise ZooError(f"chunk must be a positive number of rows, got {chunk}")
    img = F.normalize(image_emb.float(), dim=1)
    txt = F.normalize(text_emb.to(img.device).float(), dim=1)
    owner = text_to_image.to(img.device).long()
    # the score of each text with its own image, and each image's best own-text score
    pos = torch.cat([(img[owner[j : j + chunk]] * txt[j : j + chunk]).sum(1) for j in range(0, len(txt), chunk)])
    best = torch.full((len(img),), float("-inf"), device=img.device).scatter_reduce_(0, owner, pos, "amax")
    i2t = torch.zeros(len(img), dtype=torch.long, device=img.device)
    t2i = torch.zeros(len(txt), dtype=torch.long, device=img.device)
    for i0 in range(0, len(img), chunk):
        rows = torch.arange(i0, min(i0 + chunk, len(img)), device=img.device)
        for j0 in range(0, len(txt), chunk):
            s = img[i0 : i0 + chunk] @ txt[j0 : j0 + chunk].T
            other = owner[None, j0 : j0 + chunk] != rows[:, None]
            i2t[i0 : i0 + chunk] += ((s >= best[i0 : i0 + chunk, None]) & other).sum(1)
            t2i[j0 : j0 + chunk] += ((s >= pos[None, j0 : j0 + chunk]) & other).sum(0)
    return i2t.cpu(), t2i.cpu()


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk: int = 2048,
) -> dict[str, float]:
    """`image_to_text_R@K` and `text_to_image_R@K` in % for each K (open_clip's names).

    `text_to_image[j]` is the index of text j's image; an image may own several texts (a hit when any
    is in its top K). image->text averages over the images that own at least one text."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ZooError(f"ks must be positive integers (recall cut-offs), got {tuple(ks)}")
    text_to_image = torch.as_tensor(text_to_image)
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, chunk=chunk)
    has_text = torch.bincount(text_to_image.long().cpu(), minlength=len(image_emb)) > 0
    i2t = i2t[has_text]
    ks = sorted({int(k) for k in ks})
    out = {f"image_to_text_R@{k}": 100.0 * int((i2t < k).sum()) / len(i2t) for k in ks}
    out.update({f"text_to_image_R@{k}": 100.0 * int((t2i < k).sum()) / len(t2i) for k in ks})
    return out


# -- embeddings of image-caption shards ----------------------------------------------------------
CaptionSpec = str | Sequence[str] | Mapping[str, float]


def _what_it_has(sample: Mapping[str, Any]) -> str:
    meta = sample.get("meta")
    captions = meta.get("captions") if isinstance(meta, Mapping) else None
    fields = sorted(k for k in sample if not k.startswith("__") and k != "image")
    return f"fields {fields} and meta captions {sorted(captions) if isinstance(captions, Mapping) else []}"


def _caption_spec(caption: CaptionSpec) -> tuple[list[str], dict[str, float] | None]:
    """(names to read, probabilities or None for 'every named caption')."""
    if isinstance(caption, Mapping):
        ok = all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0 for p in caption.values())
        if not caption or not ok or not any(p > 0 for p in caption.values()):
            raise ZooError(f"caption probabilities must be numbers >= 0, not all 0, e.g. {{'exact': 1.0}}; got {caption!r}")
        return list(caption), dict(caption)
    names = [caption] if isinstance(caption, str) else list(caption)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ZooError(
            f"caption must name one or more captions, e.g. ('exact',) or ('caption',) for the txt member, got {caption!r}"
        )
    return names, None


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [it for it in items if it["texts"]]
    missing = [it["has"] for it in items if not it["texts"]]
    return {
        "image": torch.stack([it["image"] for it in kept]) if kept else None,
        "texts": [it["texts"] for it in kept],
        "missing": len(missing),
        "has": missing[0] if missing else None,
    }


def encode_pairs(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    urls: str | list[str],
    *,
    caption: CaptionSpec = ("exact",),
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "retrieval",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb (N, D), text_emb (M, D), text_to_image (M,)): normalised embeddings, in shard order.

    `caption`: caption names, every one a sample has becoming a text of its image ("caption" is the
    `txt` member, other names are looked up in `meta["captions"]`, as in `choose_caption`), or a
    {name: probability} dict picking one per sample with `choose_caption` (seeded, repeatable).
    Samples with none of the captions are skipped and counted."""
    from zoo.data import loader
    from zoo.data.transforms import choose_caption

    require_image_text(model, "retrieval")
    names, probabilities = _caption_spec(caption)
    transform = default_transform(model) if transform is None else transform

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        if probabilities is None:
            texts = [t for n in names for t in named_captions(sample, n)]
        else:
            try:
                texts = [choose_caption(sample, probabilities)[1]]
            except SampleError:
                texts = []
        return {"image": transform(sample["image"]) if texts else None, "texts": texts,
                "has": None if texts else _what_it_has(sample)}

    optional = tuple(dict.fromkeys([*names, "caption", "meta"]))  # "caption" (txt) too, for the error's hint
    data = loader(urls, fields=("image",), optional_fields=optional, transform=prepare, batch_size=batch_size,
                  collate=_collate, num_workers=num_workers, shuffle=0)
    try:
        total = len(data)
    except TypeError:
        total = None
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    n_images = n_missing = 0
    has = None
    with _EvalMode(model):
        for batch in progress(data, total=total, desc=desc, unit="batch"):
            n_missing += batch["missing"]
            has = has or batch["has"]
            if batch["image"] is None:
                continue
            images.append(encode_images(model, batch["image"]).cpu())
            flat = [t for ts in batch["texts"] for t in ts]
            texts.append(encode_texts(model, tokenizer, flat).cpu())
            counts = torch.tensor([len(ts) for ts in batch["texts"]])
            owners.append(torch.arange(n_images, n_images + len(counts)).repeat_interleave(counts))
            n_images += len(counts)
    if not images:
        if n_missing:
            raise ZooError(
                f"no sample in {urls} has the captions {names}: they have {has}. Pass caption= naming "
                "some of those (('caption',) reads the txt member)"
            )
        raise ZooError(f"no samples with an image in {urls}; check the shards with `zoo shards check`")
    if n_missing:
        log.warning("skipped %d of %d samples without any of the captions %s", n_missing, n_missing + n_images, names)
    return torch.cat(images), torch.cat(texts), torch.cat(owners)


def retrieval_eval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    urls: str | list[str],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    chunk: int = 2048,
    **kw: Any,
) -> dict[str, float]:
    """Recall@K both ways (`retrieval_metrics`) of the model over image-caption shards (`encode_pairs`,
    which takes the other keywords: caption, transform, batch_size, num_workers)."""
    image_emb, text_emb, text_to_image = encode_pairs(model, tokenizer, urls, **kw)
    return retrieval_metrics(image_emb, text_emb, text_to_image, ks, chunk=chunk)


__all__ = ["retrieval_metrics", "retrieval_ranks", "encode_pairs", "retrieval_eval", "DEFAULT_KS"]
