"""Frozen features of a model over shards: batched, with progress, cached on disk.

Pooling variants (computed together in one forward pass):
  `cls`      the class token after the final norm (pooled output for models without one)
  `avg`      the mean patch token after the final norm
  `cls+avg`  both, concatenated
  `lastN`    the class tokens of the last N blocks (each normalised), concatenated (DINO)
  `spacedN`  the class tokens of N evenly spaced blocks ending with the last (POA; fewer when
             the model is shallower, as POA's rule gives repeated blocks once)
The cache key covers the model's weights, the shards (paths, sizes, mtimes), the transform and
the variants, so a cache from another model or transform is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.progress import progress

log = logging.getLogger(__name__)

VARIANT_RE = re.compile(r"^(cls|avg|cls\+avg|last\d+|spaced\d+)$")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and tensors: equal only for the same weights."""
    card = getattr(model, "zoo_card", None) or {}
    if card.get("weights_sha256"):
        return f"{card['weights_sha256']}:{json.dumps(card.get('args', {}), sort_keys=True)}"
    h = hashlib.sha256(type(model).__qualname__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def data_fingerprint(urls: Sequence[str]) -> str:
    h = hashlib.sha256()
    for u in urls:
        st = os.stat(u) if os.path.exists(u) else None
        h.update(f"{os.path.abspath(u)}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
    return h.hexdigest()


def spaced_blocks(depth: int, n: int) -> list[int]:
    """n block indices evenly spaced over depth, the last one included (POA: [3, 6, 9, 11] for 12, 4)."""
    return sorted({min(depth - 1, round(depth * (i + 1) / n)) if i < n - 1 else depth - 1 for i in range(n)})


def _blocks_for(variant: str, depth: int) -> list[int]:
    n = int(re.sub(r"\D", "", variant))
    if n < 1 or (variant.startswith("last") and n > depth):
        raise ZooError(f"pooling {variant!r} needs 1..{depth} blocks for this model")
    return list(range(depth - n, depth)) if variant.startswith("last") else spaced_blocks(depth, n)


@torch.no_grad()
def pool(model: nn.Module, x: torch.Tensor, variants: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each requested pooling variant of one batch."""
    bad = [v for v in variants if not VARIANT_RE.match(v)]
    if bad:
        raise ZooError(f"unknown pooling {bad[0]!r}; use cls, avg, cls+avg, lastN or spacedN (e.g. last4)")
    prefix = getattr(model, "num_prefix_tokens", 0)
    if not hasattr(model, "blocks") or not prefix:
        if any(v != "cls" for v in variants):
            raise ZooError(f"{type(model).__name__} has no class token/blocks: only pooling 'cls' (its pooled output) works")
        return {"cls": model.forward_head(model.forward_features(x), pre_logits=True)}
    out: dict[str, torch.Tensor] = {}
    depth = len(model.blocks)
    wanted = sorted({b for v in variants if v[0] in "ls" for b in _blocks_for(v, depth)})
    if wanted:
        final, inter = model.forward_intermediates(x, indices=wanted, norm=True, return_prefix_tokens=True, output_fmt="NLC")
        cls_of = {b: t[1][:, 0] for b, t in zip(wanted, inter)}
        for v in variants:
            if v[0] in "ls":
                out[v] = torch.cat([cls_of[b] for b in _blocks_for(v, depth)], dim=1)
    else:
        final = model.forward_features(x)
    cls, avg = final[:, 0], final[:, prefix:].mean(1)
    for v in variants:
        if v == "cls":
            out[v] = cls
        elif v == "avg":
            out[v] = avg
        elif v == "cls+avg":
            out[v] = torch.cat([cls, avg], dim=1)
    return out


def extract_features(
    model: nn.Module,
    urls: str | list[str],
    *,
    variants: Sequence[str] = ("cls",),
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    label_field: str = "label",
    desc: str = "features",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({variant: (N, D) features}, (N,) labels) of `model` in eval mode over the shards, in shard order.

    `transform` maps a PIL image to a tensor (default: the model's eval transform). With
    `cache_dir`, results are stored under a key of (model, data, transform, variants)."""
    from zoo.data import loader
    from zoo.data.shards import expand_sources
    from zoo.data.transforms import SampleTransform, split_batchable

    shard_urls = [u for s in expand_sources(urls) for u in s]
    if transform is None:
        from zoo.data.transforms import eval_transform

        transform = eval_transform(model.pretrained_cfg)
    key = hashlib.sha256(
        json.dumps([model_fingerprint(model), data_fingerprint(shard_urls), repr(transform), sorted(variants), label_field]).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        log.info("features from cache %s", path)
        return cached["features"], cached["labels"]

    per_image, per_batch = split_batchable(transform)  # dtype/normalise once per batch: the same values

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": per_image(sample["image"]), "label": int(sample[label_field])}

    data = loader(shard_urls, fields=("image", label_field), transform=prepare, batch_size=batch_size,
                  batch_transform=None if per_batch is None else SampleTransform(image=per_batch),
                  num_workers=num_workers, shuffle=0)
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    labels: list[torch.Tensor] = []
    try:
        total = len(data)
    except TypeError:
        total = None
    for batch in progress(data, total=total, desc=desc, unit="batch"):
        for v, f in pool(model, batch["image"], variants).items():
            feats[v].append(f.float().cpu())
        labels.append(batch["label"])
    model.train(was_training)
    if not labels:
        raise ZooError(f"no samples with an image and a {label_field!r} in {urls}; check the shards with `zoo shards check`")
    result = {v: torch.cat(f) for v, f in feats.items()}, torch.cat(labels)
    if data.skipped:
        log.warning("skipped %d samples while extracting features: %s", sum(data.skipped.values()), dict(data.skipped))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.save({"features": result[0], "labels": result[1]}, tmp)
        tmp.replace(path)
    return result
