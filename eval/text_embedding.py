"""Offline text embeddings of a frozen LM, written into the shards (FLAME's cache; `zoo embed-text`).

Each sample's captions go through FLAME's prompts (`zoo.models.flame`): the raw alt-text in 1 prompt, a short
caption in 3 facets, a long one in 7, all facets of a caption in one LM pass. The rows, L2-normalised, are
stored as one fp16 `[n_facets, D]` array member `KEY.FIELD.npy` (FLAME: 11 x 5120); every other member is
copied byte for byte. One output shard per input shard, written aside and renamed when whole, so an
interrupted run resumes where it stopped (finished shards are kept) and nothing half-written is left.

A sample without a short or long caption gets those facets on its raw caption (FLAME's documented
deviation when there are no recaptions; counted as `fallback_*`); one without any caption is left out and
counted. `dataset.json` records the LM, layer, layout and width, which the FLAME recipe checks.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from zoo.data.fields import decode_field, encode_field, field_of
from zoo.data.reader import iter_raw_samples
from zoo.data.shards import REMOTE_PREFIXES, expand_sources, known_size
from zoo.data.transforms import named_captions
from zoo.data.writer import add_member, write_indexes
from zoo.errors import ConfigError, ZooError
from zoo.models.flame import CACHE_LAYOUT, PROMPTS, FacetTokenizer, default_layer, facet_embeddings
from zoo.progress import progress

log = logging.getLogger(__name__)

DEFAULT_CAPTIONS = {"raw": "caption", "short": "short", "long": "long"}
INFO_KEY = "text_embedding"  # what dataset.json records of the embedding


def layout(captions: Mapping[str, str | None]) -> list[tuple[str, int]]:
    """[(prompt kind, facet rows)] in cache order for the kinds that are on: raw 1, short 3, long 7."""
    return [(k, len(PROMPTS[k].facets)) for k in CACHE_LAYOUT if captions.get(k)]


def _check_captions(captions: Mapping[str, str | None]) -> dict[str, str | None]:
    unknown = set(captions) - set(CACHE_LAYOUT)
    if unknown:
        raise ConfigError(f"unknown prompt kind(s) {sorted(unknown)}; the kinds are {', '.join(CACHE_LAYOUT)}")
    out = {k: (captions.get(k) or None) for k in CACHE_LAYOUT}
    if not out["raw"]:
        raise ConfigError("the raw caption must be named (e.g. 'caption', the txt member): it is every sample's "
                          "fallback text")
    return out


def embedding_info(lm_name: str, lm: nn.Module, captions: Mapping[str, str | None], field: str, layer: int,
                   positions: str) -> dict[str, Any]:
    rows = layout(captions)
    return {"lm": lm_name, "field": field, "layer": layer, "positions": positions, "dim": int(lm.config.hidden_size),
            "layout": [[k, n] for k, n in rows], "n_facets": sum(n for _, n in rows), "captions": dict(captions),
            "dtype": "float16"}


def read_embedding_info(urls: Sequence[str]) -> dict[str, Any] | None:
    """What `embed_text_shards` recorded beside local shards (dataset.json), or None."""
    folders = {Path(u).parent for u in urls if not u.startswith(REMOTE_PREFIXES)}
    for folder in folders:
        info = folder / "dataset.json"
        if info.is_file():
            try:
                found = json.loads(info.read_text()).get(INFO_KEY)
            except (json.JSONDecodeError, AttributeError):
                found = None
            if found:
                return found
    return None


class _Embedder:
    """Captions of a batch of raw samples -> their [n_facets, D] fp16 rows, all prompt kinds."""

    def __init__(self, lm: nn.Module, captions: Mapping[str, str | None], layer: int | None, positions: str,
                 max_length: int | None, counts: Counter):
        self.lm, self.captions, self.layer, self.counts = lm, captions, layer, counts
        limit = max_length or getattr(lm.config, "max_position_embeddings", None)
        self.tokenizers = {k: FacetTokenizer(lm.tokenizer, k, max_length=limit, positions=positions)
                           for k, _ in layout(captions)}

    def texts(self, raw: Mapping[str, Any]) -> dict[str, str] | None:
        """The caption each prompt kind embeds for this sample, or None (counted) when it has no raw caption."""
        wanted = ("caption", "meta")
        sample = {"__key__": raw["__key__"]}
        for ext, data in raw.items():
            if not ext.startswith("__") and field_of(ext) in wanted and field_of(ext) not in sample:
                try:
                    sample[field_of(ext)] = decode_field(field_of(ext), ext, data)
                except ValueError:
                    self.counts[f"bad_{field_of(ext)}"] += 1
        base = named_captions(sample, self.captions["raw"])
        if not base:
            self.counts["no_caption"] += 1
            return None
        out = {"raw": base[0]}
        for kind in ("short", "long"):
            if self.captions.get(kind):
                found = named_captions(sample, self.captions[kind])
                if not found:
                    self.counts[f"fallback_{kind}"] += 1
                out[kind] = found[0] if found else base[0]
        return out

    @torch.no_grad()
    def __call__(self, texts: list[dict[str, str]]) -> np.ndarray:
        rows = [facet_embeddings(self.lm, tok([t[k] for t in texts]), self.layer) for k, tok in self.tokenizers.items()]
        return torch.cat(rows, dim=1).cpu().numpy().astype(np.float16)


def embed_text_shards(
    lm: nn.Module | str,
    data: str | Sequence[str],
    out: str | Path,
    *,
    captions: Mapping[str, str | None] = DEFAULT_CAPTIONS,
    field: str = "flame",
    layer: int | None = None,
    positions: str = "restart",
    batch_size: int = 32,
    max_length: int | None = None,
    lm_name: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Write `out/SHARD.tar` for every input shard with each sample's facet embeddings added as `KEY.FIELD.npy`.

    `lm`: a loaded LM (with `.tokenizer`) or a name `zoo.load` takes. `captions`: the caption name per prompt kind
    ("caption" is the txt member, others `meta["captions"][name]`; None leaves that kind out). Returns a report:
    samples written, shards written and kept from an earlier run, counts of what was skipped or fell back.
    `device`: where the LM runs (default: the GPU when there is one, in bf16 where it computes it natively)."""
    from zoo.models.lm import default_dtype, load_frozen_lm

    captions = _check_captions(captions)
    if not field or "." in field or field in ("image", "caption", "meta", "label"):
        raise ConfigError(f"--field must be a new member name such as 'flame' (written as KEY.flame.npy), got {field!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    name = lm_name or (lm if isinstance(lm, str) else str(getattr(lm, "zoo_source", type(lm).__name__)))
    model = load_frozen_lm(lm) if isinstance(lm, str) else lm.requires_grad_(False).eval()
    if getattr(model, "tokenizer", None) is None:
        raise ConfigError(f"language model {name!r} has no tokenizer attached; load it with zoo.load (which attaches "
                          "the one saved beside it)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = next(model.parameters()).dtype
    model = model.to(device=device, dtype=default_dtype(device) if dtype == torch.float32 else dtype)
    layer = default_layer(model) if layer is None else int(layer)
    urls = [u for source in expand_sources(data if isinstance(data, str) else list(data)) for u in source]
    out = Path(out).expanduser()
    for u in urls:
        if not u.startswith(REMOTE_PREFIXES) and Path(u).resolve().parent == out.resolve():
            raise ZooError(f"--out {out} is the folder of the input shards; write the embedded shards to another folder")
    names = [Path(u.split("::")[-1]).name for u in urls]
    if len(set(names)) != len(names):
        raise ZooError("the input shards' file names repeat (from several folders); embed each folder on its own")
    out.mkdir(parents=True, exist_ok=True)
    info = embedding_info(name, model, captions, field, layer, positions)
    done_file = out / ".embed-text.json"  # what an earlier, interrupted run was doing: resume only the same job
    if done_file.is_file():
        earlier = json.loads(done_file.read_text())
        if earlier.get("info") != info:
            raise ZooError(f"{out} holds shards embedded with other settings ({earlier.get('info')}); use an empty "
                           "folder or remove it")
    done_file.write_text(json.dumps({"info": info}) + "\n")

    counts: Counter = Counter()
    embed = _Embedder(model, captions, layer, positions, max_length, counts)
    sizes: dict[str, int] = {}
    kept = 0
    bar = progress(total=known_size(urls), desc="embed-text", unit="caption")
    mtime = int(time.time())
    try:
        for url, shard in zip(urls, names):
            final = out / shard
            if final.is_file():  # finished by an earlier run
                n = sum(1 for _ in iter_raw_samples([str(final)], Counter()))
                sizes[shard], kept = n, kept + 1
                bar.update(n)
                continue
            tmp = out / f".{shard}.part"
            n = 0
            try:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for batch in _batches(iter_raw_samples([url], counts), embed, batch_size):
                        rows = embed([t for _, t in batch])
                        for (raw, _), emb in zip(batch, rows):
                            key = str(raw["__key__"])
                            for ext, data_ in raw.items():
                                if not ext.startswith("__") and field_of(ext) != field:
                                    add_member(tar, f"{key}.{ext}", data_, mtime)
                            member, data_ = encode_field(field, emb)  # KEY.FIELD.npy
                            add_member(tar, f"{key}.{member}", data_, mtime)
                        n += len(batch)
                        bar.update(len(batch))
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            sizes[shard] = n
    finally:
        bar.close()
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    write_indexes(out, [out / s for s in names], sizes, name=out.name, split="train")
    dataset = {"num_samples": sum(sizes.values()), "shards": len(names), INFO_KEY: info,
               "derived_from": data if isinstance(data, str) else list(data), "skipped": dict(counts)}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    done_file.unlink(missing_ok=True)
    if counts.get("no_caption"):
        log.warning("embed-text: %d samples without a %r caption were left out", counts["no_caption"], captions["raw"])
    return {"out": str(out), "samples": sum(sizes.values()), "shards": len(names), "kept_from_earlier_run": kept,
            "counts": dict(counts), **info}


def _batches(raws: Iterator[dict[str, Any]], embed: _Embedder, size: int) -> Iterator[list[tuple[dict[str, Any], dict[str, str]]]]:
    batch: list[tuple[dict[str, Any], dict[str, str]]] = []
    for raw in raws:
        texts = embed.texts(raw)
        if texts is None:
            continue
        batch.append((raw, texts))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_embedded(urls: Sequence[str], field: str, n_facets: int, dim: int, command: str) -> None:
    """Refuse shards whose first sample lacks the `FIELD.npy` member, or whose rows are not [n_facets, dim],
    with a one-line error naming `command` (the `zoo embed-text` call that makes them)."""
    for raw in iter_raw_samples(list(urls[:1]), Counter()):
        member = next((ext for ext in raw if not ext.startswith("__") and field_of(ext) == field), None)
        if member is None:
            have = sorted(ext for ext in raw if not ext.startswith("__"))
            raise ZooError(f"{urls[0]}: samples have no {field}.npy member (they have {have}); make the shards with "
                           f"`{command}`")
        rows = decode_field(field, member, raw[member])
        if getattr(rows, "shape", None) != (n_facets, dim):
            raise ZooError(f"{urls[0]}: {field}.npy holds {getattr(rows, 'shape', None)} per sample, the recipe needs "
                           f"({n_facets}, {dim}) (facets, LM width): embed the shards with the recipe's LM and captions "
                           f"(`{command}`) or set method.facets / method.lm to match them")
        return
    raise ZooError(f"{urls[0] if urls else 'the data'}: no samples to check")


__all__ = ["embed_text_shards", "check_embedded", "read_embedding_info", "layout", "DEFAULT_CAPTIONS", "INFO_KEY"]
