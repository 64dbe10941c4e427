"""Caption tools: CLIP scores of image-caption pairs, Data-Filtering-Networks-style filtering by
score, and recaptioning with a pluggable captioner (open_clip's CoCa first).

    scores = score_pairs(model, "data/*.tar", caption="caption")     # PairScore rows + counts
    write_sidecars(scores, "open_clip:ViT-B-32/TAG")                 # data/clip_scores.<model>.<caption>.jsonl
    report = filter_shards("data/*.tar", "data/top30", 0.3, model=model)
    report = recaption("data/*.tar", "data/syn", "coca:coca_ViT-L-14/TAG", n_captions=5)

A score is the cosine similarity of the L2-normalised image and text embeddings (the CLIP score of
DFN / DataComp filtering, without CLIPScore's x2.5 and clamp at 0). One score per sample: a caption
name holding a list (e.g. synthetic captions) is scored by its FIRST entry.

Shards written here keep each sample's key and copy every member byte for byte, except the `json`
member, which gains `clip_score` (score, filter) or `captions[NAME]` (recaption). Samples whose
members cannot be read are skipped and counted, as everywhere in zoo.data.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from zoo.data.fields import FieldError, decode_field, field_of
from zoo.data.reader import decode_sample, iter_raw_samples
from zoo.data.shards import REMOTE_PREFIXES, expand_sources, known_size
from zoo.data.writer import write_shards
from zoo.data.transforms import named_captions
from zoo.errors import DownloadError, UnknownNameError, ZooError
from zoo.progress import progress
from zoo.registry import Registry, close_matches

log = logging.getLogger(__name__)

SCORE_KEY = "clip_score"  # meta["clip_score"][caption name] = score
SIDECAR_PREFIX = "clip_scores"
HISTOGRAM_FILE = "scores.png"
PERCENTILES = (5, 25, 50, 75, 95)


# -- scores ----------------------------------------------------------------------------------------
class PairScore(NamedTuple):
    """The CLIP score of one sample's image with its caption `caption` (a name), whose text is `text`."""

    url: str
    key: str
    caption: str
    text: str
    score: float


def summarize(values: Sequence[float]) -> dict[str, float]:
    """count, mean, std, min, p5 ... p95, max of a list of scores."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    out = {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min())}
    out.update({f"p{p}": float(x) for p, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))})
    out["max"] = float(v.max())
    return out


@dataclass
class Scores:
    """What `score_pairs` returns: one `PairScore` row per scored sample, in shard order, plus what was
    not scored: `missing` samples without the caption, `skipped` unreadable ones by reason."""

    caption: str
    rows: list[PairScore]
    missing: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __iter__(self) -> Iterator[PairScore]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PairScore:
        return self.rows[i]

    def values(self) -> list[float]:
        return [r.score for r in self.rows]

    def summary(self) -> dict[str, Any]:
        """Statistics of the scores and the counts of samples not scored."""
        return {"caption": self.caption, **summarize(self.values()), "missing_caption": self.missing,
                "skipped": dict(self.skipped)}


# -- reading shards ----------------------------------------------------------------------------------
def _urls(urls: str | Sequence[str]) -> list[str]:
    return [u for source in expand_sources(urls if isinstance(urls, str) else list(urls)) for u in source]


def _raw_samples(urls: list[str], counts: Counter, desc: str | None) -> Iterator[dict[str, Any]]:
    """Raw samples ({__key__, __url__, ext: bytes}) of the shards, with a progress bar unless `desc` is
    None (when `write_shards` shows one)."""
    if desc is None:
        return iter_raw_samples(urls, counts)
    return progress(iter_raw_samples(urls, counts), total=known_size(urls), desc=desc, unit="img")


def _what_it_has(sample: Mapping[str, Any]) -> str:
    meta = sample.get("meta")
    captions = meta.get("captions") if isinstance(meta, Mapping) else None
    fields = sorted(k for k in sample if not k.startswith("__") and k != "image")
    return f"fields {fields} and meta captions {sorted(captions) if isinstance(captions, Mapping) else []}"


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ZooError(f"batch_size must be a positive integer, got {batch_size!r}")


def default_tokenizer(model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """The text tokenizer that goes with a model: its own `.tokenizer` (zoo CLIP models), else open_clip's
    for a model loaded as `open_clip:ARCH[/TAG]`."""
    from zoo.eval.zeroshot import model_name

    tok = getattr(model, "tokenizer", None)
    if callable(tok):
        return tok
    arch = str((getattr(model, "zoo_card", None) or {}).get("arch", ""))
    if arch.startswith("open_clip:"):
        import open_clip

        return open_clip.get_tokenizer(arch.removeprefix("open_clip:"))
    raise ZooError(
        f"{model_name(model)} has no text tokenizer here; pass tokenizer= (e.g. open_clip.get_tokenizer(ARCH)) "
        "or load the model as open_clip:ARCH/TAG"
    )


def _scored(
    model: nn.Module,
    urls: list[str],
    caption: str,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    counts: Counter,
    desc: str | None,
) -> Iterator[tuple[dict[str, Any], dict[str, Any], str | None, float | None]]:
    """(raw sample, decoded sample without its image, caption text or None, score or None) for every
    readable sample in shard order; `batch_size` images and texts are encoded at a time."""
    from zoo.eval.zeroshot import _EvalMode, encode_images, encode_texts

    optional = tuple(dict.fromkeys(("meta", "caption", caption)))
    pending: list[tuple[dict[str, Any], dict[str, Any], str | None, torch.Tensor | None]] = []

    def flush() -> Iterator[tuple[dict[str, Any], dict[str, Any], str | None, float | None]]:
        items = [p for p in pending if p[2] is not None]
        scores: list[float] = []
        if items:
            with _EvalMode(model):
                img = encode_images(model, torch.stack([p[3] for p in items]))
                txt = encode_texts(model, tokenizer, [p[2] for p in items]).to(img.device)
                sims = (img * txt).sum(1)
            if not torch.isfinite(sims).all():
                raise ZooError("the embeddings contain NaN or inf: the model diverged or overflowed (try float32)")
            scores = sims.cpu().tolist()
        it = iter(scores)
        out = [(raw, s, text, next(it) if text is not None else None) for raw, s, text, _ in pending]
        pending.clear()
        yield from out

    n = 0
    for raw in _raw_samples(urls, counts, desc):
        try:
            sample = decode_sample(raw, ("image",), optional)
        except FieldError as e:
            counts[e.reason] += 1
            continue
        texts = named_captions(sample, caption)
        text = texts[0] if texts else None
        image = transform(sample.pop("image")) if text is not None else None
        pending.append((raw, sample, text, image))
        n += text is not None
        if n == batch_size:
            yield from flush()
            n = 0
    yield from flush()


def _no_scores_error(urls: Sequence[str], caption: str, has: str | None) -> ZooError:
    if has is not None:
        return ZooError(
            f"no sample in {urls[0]}{' ...' if len(urls) > 1 else ''} has a caption {caption!r}: they have {has}. "
            "Pass --caption (caption=) naming one of those ('caption' is the txt member)"
        )
    return ZooError(f"no readable sample with an image in {urls[0]}{' ...' if len(urls) > 1 else ''}; "
                    "check the shards with `zoo shards check`")


def score_pairs(
    model: nn.Module,
    urls: str | Sequence[str],
    *,
    caption: str = "caption",
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> Scores:
    """The CLIP score of every sample's image with its caption `caption`, in shard order.

    `caption`: a caption name as in `named_captions` ("caption" is the txt member, other names a
    top-level text field or `meta["captions"][name]`); a list-valued caption scores its first entry.
    Samples without it are skipped and counted (`Scores.missing`), as are unreadable ones
    (`Scores.skipped`). `tokenizer` / `transform` default to the model's own (`default_tokenizer`,
    `zoo.eval.zeroshot.default_transform`). Eval mode and no autograd while encoding."""
    from zoo.eval.zeroshot import default_transform, require_image_text

    require_image_text(model, "caption scoring")
    _check_batch_size(batch_size)
    urls = _urls(urls)
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    transform = default_transform(model) if transform is None else transform
    counts: Counter = Counter()
    rows: list[PairScore] = []
    missing = 0
    has = None
    for raw, sample, text, score in _scored(model, urls, caption, tokenizer, transform, batch_size, counts, "scoring"):
        if text is None:
            missing += 1
            has = has or _what_it_has(sample)
            continue
        rows.append(PairScore(str(raw["__url__"]), str(raw["__key__"]), caption, text, float(score)))
    if not rows:
        raise _no_scores_error(urls, caption, has)
    if missing:
        log.warning("%d of %d samples have no caption %r: not scored", missing, missing + len(rows), caption)
    if counts:
        log.warning("skipped unreadable samples: %s", ", ".join(f"{n} {r}" for r, n in counts.most_common()))
    return Scores(caption, rows, missing, counts)


# -- sidecar files -------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "model"


def sidecar_name(model_name: str, caption: str) -> str:
    """`clip_scores.<model>.<caption>.jsonl`: the file name states which model scored which caption."""
    path = Path(model_name)
    if ":" not in model_name and (path.is_dir() or path.is_file()):
        model_name = path.name  # a local model directory or weights file: its name, not its path
    return f"{SIDECAR_PREFIX}.{_slug(model_name)}.{_slug(caption)}.jsonl"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecars(scores: Scores | Sequence[PairScore], model_name: str, caption: str | None = None) -> list[Path]:
    """One JSONL file of scores beside each folder of shards (`sidecar_name`), one line per sample:
    {url, key, caption, text, score}. Each file appears whole (written aside, then renamed)."""
    rows = list(scores)
    caption = caption or (scores.caption if isinstance(scores, Scores) else rows[0].caption if rows else "caption")
    groups: dict[Path, list[PairScore]] = {}
    for r in rows:
        if r.url.startswith(REMOTE_PREFIXES):
            raise ZooError(f"cannot write scores beside remote shards ({r.url}); pass --out DIR to write new shards")
        groups.setdefault(Path(r.url).parent, []).append(r)
    paths = []
    for folder, group in groups.items():
        path = folder / sidecar_name(model_name, caption)
        lines = [json.dumps({"url": r.url, "key": r.key, "caption": r.caption, "text": r.text, "score": r.score})
                 for r in group]
        _atomic_write(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def read_scores(path: str | Path, caption: str | None = None) -> dict[tuple[str, str], float]:
    """{(shard file name, key): score} from a sidecar JSONL. Rows match samples by shard file name and
    key, so a sidecar covers the shards of one folder. `caption` checks which caption was scored."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"scores file {path} not found; write one with `zoo captions score MODEL --data ...`")
    table: dict[tuple[str, str], float] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ident = (Path(str(row["url"])).name, str(row["key"]))
                score = float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ZooError(f"{path}:{i} is not a score line {{url, key, caption, score}}; "
                               "rewrite the file with `zoo captions score`") from None
            if caption is not None and row.get("caption", caption) != caption:
                raise ZooError(f"{path} holds scores of caption {row.get('caption')!r}, not {caption!r}; "
                               f"pass --caption {row.get('caption')} or score {caption!r} first")
            if ident in table:
                raise ZooError(f"{path} scores shard {ident[0]} key {ident[1]} twice; a scores file covers one "
                               "folder of shards (rescore, or pass the right file with --scores)")
            table[ident] = score
    return table


def find_sidecars(urls: str | Sequence[str], caption: str) -> list[Path]:
    """The score files for `caption` beside the shards (any model)."""
    folders = {Path(u).parent for u in _urls(urls) if not u.startswith(REMOTE_PREFIXES)}
    pattern = f"{SIDECAR_PREFIX}.*.{_slug(caption)}.jsonl"
    return sorted(p for folder in folders for p in folder.glob(pattern))


# -- writing shards --------------------------------------------------------------------------------------
class _Keys:
    """Output keys: the input key, made safe for webdataset ('.' and '/' -> '_') and unique in the output."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.renamed = 0

    def __call__(self, key: str) -> str:
        base = re.sub(r"[./]", "_", str(key)) or "sample"
        new, i = base, 1
        while new in self.seen:
            new, i = f"{base}_{i}", i + 1
        self.renamed += new != key
        self.seen.add(new)
        return new


def _meta_member(raw: Mapping[str, Any]) -> str | None:
    return next((ext for ext in raw if not ext.startswith("__") and field_of(ext) == "meta"), None)


def _read_meta(raw: Mapping[str, Any], counts: Counter) -> dict[str, Any] | None:
    """The sample's json member as a dict ({} without one); None (counted) when it is not a JSON object."""
    ext = _meta_member(raw)
    if ext is None:
        return {}
    try:
        meta = decode_field("meta", ext, raw[ext])
    except FieldError:
        meta = None
    if not isinstance(meta, dict):
        counts["json_not_an_object"] += 1
        return None
    return meta


def _out_sample(raw: Mapping[str, Any], key: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sample for `write_shards`: every member of `raw` verbatim, the json member replaced by `meta` if given."""
    members = {ext: data for ext, data in raw.items() if not ext.startswith("__")}
    out: dict[str, Any] = {"__key__": key}
    if meta is not None:
        members.pop(_meta_member(raw) or "", None)
        out["meta"] = meta
    out["__members__"] = members
    return out


def _with_score(meta: dict[str, Any], caption: str, score: float) -> dict[str, Any]:
    old = meta.get(SCORE_KEY)
    return {**meta, SCORE_KEY: {**(old if isinstance(old, Mapping) else {}), caption: score}}


def _prepare_out(out: str | Path, urls: list[str]) -> Path:
    """The output folder, refused when it is the input's folder or already holds shards."""
    out = Path(out).expanduser()
    target = out.resolve()
    for u in urls:
        if not u.startswith(REMOTE_PREFIXES) and Path(u).resolve().parent == target:
            raise ZooError(f"--out {out} is the folder of the input shards; write the new shards to another folder")
    if out.is_dir() and any(out.glob("*.tar")):
        raise ZooError(f"{out} already holds shards (*.tar); choose an empty folder or remove them first")
    return out


def _dataset_info(urls: list[str], pattern: Any, op: dict[str, Any]) -> dict[str, Any]:
    """The input's dataset.json (class names ...) with this operation appended to its `caption_tools` history."""
    folders = {Path(u).parent for u in urls if not u.startswith(REMOTE_PREFIXES)}
    base: dict[str, Any] = {}
    if len(folders) == 1 and (info := folders.pop() / "dataset.json").is_file():
        try:
            loaded = json.loads(info.read_text())
            base = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            base = {}
    for k in ("num_samples", "fields", "shards"):  # write_shards recounts these
        base.pop(k, None)
    history = list(base.get("caption_tools") or [])
    return {**base, "derived_from": pattern if isinstance(pattern, str) else list(pattern),
            "caption_tools": [*history, op]}


# -- score: sidecar or new shards ------------------------------------------------------------------------
def score_shards(
    model: nn.Module,
    urls: str | Sequence[str],
    *,
    model_name: str,
    caption: str = "caption",
    out: str | Path | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
    maxcount: int = 1000,
) -> dict[str, Any]:
    """Score every pair (`score_pairs`) and write the scores beside the shards (`write_sidecars`), or with
    `out` write new shards whose samples carry `meta["clip_score"][caption]` (samples without the
    caption are copied unscored). Returns the summary: count, mean, percentiles, where it wrote."""
    from zoo.eval.zeroshot import default_transform, require_image_text

    if out is None:
        remote = [u for u in _urls(urls) if u.startswith(REMOTE_PREFIXES)]
        if remote:
            raise ZooError(f"cannot write scores beside remote shards ({remote[0]}); pass --out DIR to write new shards")
        scores = score_pairs(model, urls, caption=caption, tokenizer=tokenizer, transform=transform,
                             batch_size=batch_size)
        paths = write_sidecars(scores, model_name, caption)
        return {"model": model_name, **scores.summary(), "sidecars": [str(p) for p in paths]}

    require_image_text(model, "caption scoring")
    _check_batch_size(batch_size)
    url_list = _urls(urls)
    out = _prepare_out(out, url_list)
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    transform = default_transform(model) if transform is None else transform
    counts: Counter = Counter()
    values: list[float] = []
    missing = 0
    has = None
    keys = _Keys()

    def samples() -> Iterator[dict[str, Any]]:
        nonlocal missing, has
        for raw, sample, text, score in _scored(model, url_list, caption, tokenizer, transform, batch_size,
                                                counts, None):
            meta = None
            if text is None:
                missing += 1
                has = has or _what_it_has(sample)
            else:
                values.append(score)
                meta = _read_meta(raw, counts)
                meta = None if meta is None else _with_score(meta, caption, score)
            yield _out_sample(raw, keys(str(raw["__key__"])), meta)

    op = {"op": "score", "model": model_name, "caption": caption}
    shards = write_shards(samples(), out, maxcount=maxcount, total=known_size(url_list), desc="scoring",
                          info=_dataset_info(url_list, urls, op))
    if not values:
        raise _no_scores_error(url_list, caption, has)
    return {"model": model_name, "caption": caption, **summarize(values), "missing_caption": missing,
            "skipped": dict(counts), "renamed_keys": keys.renamed, "out": str(out), "shards": len(shards)}


# -- filter ---------------------------------------------------------------------------------------------
def keep_count(keep_top: float, total: int) -> int:
    """How many of `total` samples `keep_top` keeps: ceil(keep_top * total), so any positive fraction
    keeps at least one sample (float noise below 1e-9 is rounded away: 0.3 of 10 keeps 3)."""
    return min(total, math.ceil(round(keep_top * total, 9)))


def _check_fraction(keep_top: Any) -> float:
    ok = isinstance(keep_top, (int, float)) and not isinstance(keep_top, bool) and math.isfinite(keep_top)
    if not ok or not 0 < keep_top <= 1:
        raise ZooError(f"--keep-top must be a fraction in (0, 1], e.g. 0.3 keeps the best-aligned 30% of pairs; "
                       f"got {keep_top!r}")
    return float(keep_top)


def filter_shards(
    urls: str | Sequence[str],
    out: str | Path,
    keep_top: float,
    *,
    caption: str = "caption",
    scores: str | Path | None = None,
    model: nn.Module | None = None,
    model_name: str | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 64,
    drop_unscored: bool = False,
    maxcount: int = 1000,
    bins: int = 40,
) -> dict[str, Any]:
    """Keep the best-aligned `keep_top` fraction of the pairs by CLIP score (Data Filtering Networks):
    write those samples, unchanged and in shard order, as new shards in `out`, and a histogram of all
    scores with the threshold marked as `out/scores.png`.

    Scores come from `model` (computed now), a sidecar file `scores`, or else the samples'
    `meta["clip_score"][caption]` (and, when no sample has one, the one sidecar for `caption` beside
    the shards). `keep_count` samples are kept, the top-scored (ties: the earlier sample). Every sample
    needs a score unless `drop_unscored` (then samples without one are dropped and counted). Kept
    samples carry their score in `meta["clip_score"]`."""
    from zoo.eval.zeroshot import model_name as _name_of

    keep_top = _check_fraction(keep_top)
    if scores is not None and model is not None:
        raise ZooError("give the scores either as --scores FILE or as --model MODEL, not both")
    url_list = _urls(urls)
    out = _prepare_out(out, url_list)
    table: dict[tuple[str, str], float] = {}
    counts: Counter = Counter()
    unscored = 0
    first_unscored: tuple[str, str] | None = None
    add_scores = True

    if model is not None:
        model_name = model_name or _name_of(model)
        source = f"model {model_name}"
        got = score_pairs(model, url_list, caption=caption, tokenizer=tokenizer, transform=transform,
                          batch_size=batch_size)
        counts.update(got.skipped)
        table = {(r.url, r.key): r.score for r in got}
        unscored = got.missing
        if unscored and not drop_unscored:
            raise ZooError(f"{unscored} of {unscored + len(got)} samples have no caption {caption!r} to score; pass "
                           "--caption naming a caption every sample has, or --drop-unscored to drop them")
    else:
        side = None
        if scores is not None:
            side = read_scores(scores, caption)
            source = f"scores file {scores}"
        read: list[tuple[tuple[str, str], float | None]] = []
        for raw in _raw_samples(url_list, counts, "reading scores"):
            ident = (str(raw["__url__"]), str(raw["__key__"]))
            if side is not None:
                value = side.get((Path(ident[0]).name, ident[1]))
            else:
                meta = _read_meta(raw, counts) or {}
                value = meta.get(SCORE_KEY, {}).get(caption) if isinstance(meta.get(SCORE_KEY), Mapping) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            read.append((ident, float(value) if ok else None))
        if side is None:
            source = "meta clip_score"
            add_scores = False
            if read and all(v is None for _, v in read):  # nothing in the json: a sidecar beside the shards?
                found = find_sidecars(url_list, caption)
                if len(found) > 1:
                    raise ZooError(f"several score files for caption {caption!r} beside the shards "
                                   f"({', '.join(p.name for p in found)}); choose one with --scores FILE")
                if found:
                    side = read_scores(found[0], caption)
                    source = f"scores file {found[0]}"
                    add_scores = True
                    read = [(ident, side.get((Path(ident[0]).name, ident[1]))) for ident, _ in read]
        for ident, value in read:
            if value is None:
                unscored += 1
                first_unscored = first_unscored or ident
            else:
                table[ident] = value
        if unscored and not drop_unscored:
            where = f" (first: key {first_unscored[1]} in {first_unscored[0]})" if first_unscored else ""
            if not table:
                raise ZooError(f"no scores for caption {caption!r} in the shards' json or beside them; score them "
                               "first with `zoo captions score MODEL --data ...`, or pass --scores FILE or --model MODEL")
            raise ZooError(f"{unscored} of {len(read)} samples have no {caption!r} score in the {source}{where}; "
                           "rescore with `zoo captions score MODEL --data ...`, pass --model MODEL to score now, "
                           "or --drop-unscored to drop them")
    if not table:
        raise ZooError(f"no scored samples in {url_list[0]}{' ...' if len(url_list) > 1 else ''}; "
                       "check the shards with `zoo shards check`")

    total = len(table)
    n_keep = keep_count(keep_top, total)
    ranked = sorted(table.items(), key=lambda kv: -kv[1])  # stable: ties keep shard order
    kept = dict(ranked[:n_keep])
    threshold = ranked[n_keep - 1][1]
    keys = _Keys()
    meta_counts: Counter = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for raw in iter_raw_samples(url_list, Counter()):  # read errors were counted on the first pass
            ident = (str(raw["__url__"]), str(raw["__key__"]))
            if ident not in kept:
                continue
            meta = None
            if add_scores:
                meta = _read_meta(raw, meta_counts)
                meta = None if meta is None else _with_score(meta, caption, kept[ident])
            yield _out_sample(raw, keys(ident[1]), meta)

    report = {"caption": caption, "scores_from": source, "keep_top": keep_top, "kept": n_keep, "total": total,
              "kept_fraction": n_keep / total, "threshold": threshold}
    shards = write_shards(samples(), out, maxcount=maxcount, total=n_keep, desc="writing",
                          info=_dataset_info(url_list, urls, {"op": "filter", **report}))
    from zoo.engine.plots import histogram

    png = histogram(list(table.values()), out / HISTOGRAM_FILE, bins=bins, marker=threshold,
                    marker_label=f"keep >= {threshold:.4f}",
                    title=f"CLIP score of {total} pairs ({caption}): kept top {n_keep} = "
                          f"{100 * n_keep / total:.1f}%")
    return {**report, "scores": summarize(list(table.values())), "unscored_dropped": unscored,
            "skipped": dict(counts + meta_counts), "renamed_keys": keys.renamed, "out": str(out),
            "shards": len(shards), "histogram": str(png)}


# -- captioners ------------------------------------------------------------------------------------------
class Captioner(abc.ABC):
    """Images in, captions out: `captioner(images)` -> one caption per image of a (B, C, H, W) batch made
    with `captioner.transform` (PIL image -> tensor). A sampling captioner gives a new caption on each
    call, so an image repeated K times in a batch gets K captions."""

    name: str = "captioner"
    transform: Callable[[Any], torch.Tensor]

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> list[str]:
        """One caption per image."""


CAPTIONERS = Registry("captioner")  # scheme -> factory(spec after the colon, **options) -> Captioner


def build_captioner(spec: str, **options: Any) -> Captioner:
    """A captioner from `SCHEME:SPEC`, e.g. `coca:coca_ViT-L-14/mscoco_finetuned_laion2b_s13b_b90k`.
    Add a backend with `CAPTIONERS.register("name", factory, usage="name:...")`."""
    scheme, sep, rest = str(spec).partition(":")
    if scheme not in CAPTIONERS or not sep:
        usages = ", ".join(e.meta.get("usage", e.name) for e in CAPTIONERS)
        hint = close_matches(scheme, CAPTIONERS.names())
        raise UnknownNameError(f"unknown captioner {spec!r}" + (f"; did you mean {hint[0]}:...?" if hint else "")
                               + f" (captioners: {usages})")
    return CAPTIONERS.build(scheme, spec=rest, **options)


GENERATIONS = ("top_p", "top_k", "greedy", "beam")


class CocaCaptioner(Captioner):
    """open_clip's CoCa as a captioner: its text decoder run autoregressively on the image embeddings.

    `generation`: `top_p` (nucleus sampling, the default), `top_k` or `greedy` are decoded here, the
    same loop as open_clip's `CoCa.generate` for those modes without its transformers dependency;
    `beam` calls `CoCa.generate(generation_type="beam_search")`, which needs transformers<5.
    Sampling draws from its own generator seeded with `seed`. At most `seq_len` tokens with the start
    and end tokens (capped by the text context), at least `min_seq_len`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        transform: Callable[[Any], torch.Tensor] | None = None,
        generation: str = "top_p",
        top_p: float = 0.9,
        top_k: int = 50,
        temperature: float = 1.0,
        seq_len: int = 30,
        min_seq_len: int = 5,
        seed: int = 0,
        name: str = "coca",
    ):
        from zoo.eval.zeroshot import default_transform, model_device

        if not callable(getattr(model, "text_decoder", None)):
            raise ZooError(f"{name} is not a CoCa model (it has no text_decoder); use a coca_* open_clip architecture")
        if generation not in GENERATIONS:
            hint = close_matches(str(generation), list(GENERATIONS), n=1)
            raise ZooError(f"generation must be one of {', '.join(GENERATIONS)}, got {generation!r}"
                           + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if not 0 < top_p <= 1 or top_k < 1 or not temperature > 0:
            raise ZooError(f"need 0 < top_p <= 1, top_k >= 1 and temperature > 0; got {top_p}, {top_k}, {temperature}")
        if generation == "beam":
            from open_clip import coca_model

            if not getattr(coca_model, "_has_transformers", False):
                raise ZooError("generation 'beam' runs open_clip's CoCa.generate, which needs transformers<5 "
                               "(pip install 'transformers<5'); or use top_p, top_k or greedy, which need nothing more")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.transform = default_transform(model) if transform is None else transform
        self.generation, self.top_p, self.top_k, self.temperature = generation, float(top_p), int(top_k), float(temperature)
        context = int(getattr(getattr(model, "text", None), "context_length", None) or getattr(model, "context_length", 77))
        self.seq_len = max(min(int(seq_len), context), 3)
        self.min_seq_len = max(min(int(min_seq_len), self.seq_len - 1), 1)
        self.sot = int(getattr(tokenizer, "sot_token_id", None) or 49406)
        self.eot = int(getattr(tokenizer, "eot_token_id", None) or 49407)
        self.pad = int(getattr(model, "pad_id", 0))
        decode = getattr(tokenizer, "decode", None)
        if decode is None and hasattr(getattr(tokenizer, "tokenizer", None), "decode"):  # open_clip's HFTokenizer
            decode = lambda ids: tokenizer.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        if decode is None:
            raise ZooError(f"the tokenizer of {name} cannot decode token ids; pass a tokenizer with .decode(ids)")
        self._decode = decode
        self.generator = torch.Generator(device=model_device(model)).manual_seed(int(seed))

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text: after the start token, up to the end token, whitespace normalised."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot:
            ids = ids[1:]
        if self.eot in ids:
            ids = ids[: ids.index(self.eot)]
        return " ".join(self._decode(ids).split())

    def _filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits outside the top-k / nucleus set to -inf."""
        if self.generation == "top_k":
            k = min(self.top_k, logits.shape[-1])
            kth = logits.topk(k, dim=-1).values[:, -1:]
            return logits.masked_fill(logits < kth, float("-inf"))
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest set with mass >= top_p
        return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))

    def _sample(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        latent, embs = model._encode_image(images)
        out = torch.full((len(images), 1), self.sot, dtype=torch.long, device=images.device)
        done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        while out.shape[1] < self.seq_len and not done.all():
            logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            if not torch.isfinite(logits).all():
                raise ZooError(f"{self.name} produced NaN or inf logits: its weights are broken (or overflowed; try float32)")
            logits = logits.float() / self.temperature
            logits[:, [self.sot, self.pad]] = float("-inf")  # never valid outputs
            if out.shape[1] < self.min_seq_len:
                logits[:, self.eot] = float("-inf")
            if out.shape[1] + 1 == self.seq_len:
                nxt = torch.full_like(done, self.eot, dtype=torch.long)
            elif self.generation == "greedy":
                nxt = logits.argmax(-1)
            else:
                probs = self._filtered(logits).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            nxt = nxt.masked_fill(done, self.pad)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == self.eot
        return out

    def __call__(self, images: torch.Tensor) -> list[str]:
        from zoo.eval.zeroshot import _EvalMode, model_device

        images = images.to(model_device(self.model))
        with _EvalMode(self.model):
            if self.generation == "beam":
                tokens = self.model.generate(images, generation_type="beam_search", seq_len=self.seq_len,
                                             min_seq_len=self.min_seq_len, sot_token_id=self.sot,
                                             eos_token_id=self.eot)
            else:
                tokens = self._sample(images)
        return [self.decode(t) for t in tokens.tolist()]


def coca_captioner(spec: str, *, device: str | torch.device | None = None, **options: Any) -> CocaCaptioner:
    """`coca:ARCH[/TAG]`: open_clip's `create_model(ARCH, pretrained=TAG or None)` (a TAG may also be a
    local weights file). Without a TAG the weights are random (a warning says so): for tests only."""
    import open_clip

    arch, _, tag = spec.partition("/")
    cocas = [m for m in open_clip.list_models() if "multimodal_cfg" in (open_clip.get_model_config(m) or {})]
    if not arch or arch not in open_clip.list_models():
        hint = close_matches(arch, cocas)
        raise UnknownNameError(f"open_clip has no model {arch!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else "")
                               + f" (CoCa models: {', '.join(cocas)}; write coca:ARCH/TAG)")
    if arch not in cocas:
        raise ZooError(f"{arch} is not a CoCa model (no text decoder to caption with); use one of {', '.join(cocas)}")
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        log.warning("coca:%s has no weights tag: captioning with RANDOM weights (the captions are noise); "
                    "use coca:%s/%s for real captions", arch, arch, tags[0] if tags else "TAG")
    try:
        model = open_clip.create_model(arch, pretrained=tag or None, device=device)
    except (RuntimeError, OSError) as e:
        raise DownloadError(f"coca:{spec}: could not get pretrained weights ({str(e).splitlines()[0]})") from None
    projection = getattr(model.text_decoder, "text_projection", None)
    if not tag and isinstance(projection, torch.Tensor):
        # open_clip (3.3) never initialises the decoder's text_projection (torch.empty memory: zeros, NaN,
        # anything; its init_parameters fails): draw it as that method means to, so random is random.
        with torch.no_grad():
            nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
    model.zoo_source = f"coca:{spec}"
    return CocaCaptioner(model, open_clip.get_tokenizer(arch), name=f"coca:{spec}", **options)


CAPTIONERS.register("coca", coca_captioner, usage="coca:ARCH[/TAG]",
                    description="open_clip CoCa: its text decoder, top-p / top-k / greedy sampling or beam search")


# -- recaption -----------------------------------------------------------------------------------------
def recaption(
    urls: str | Sequence[str],
    out: str | Path,
    captioner: Captioner | str,
    *,
    name: str = "synthetic",
    n_captions: int = 1,
    batch_size: int = 32,
    maxcount: int = 1000,
) -> dict[str, Any]:
    """Write new shards in `out` whose samples gain `n_captions` generated captions as the list
    `meta["captions"][name]` (replacing one of that name), every other member copied unchanged, so a
    caption policy (e.g. the CLIP recipe's `quality_captions: [NAME]`) can pick them. `captioner` is a
    `Captioner` or a spec for `build_captioner`; `batch_size` images are captioned at a time."""
    if not isinstance(name, str) or not name.strip() or name in ("caption", "meta", "image"):
        raise ZooError(f"--name must name the new captions, e.g. 'synthetic' (not a field name); got {name!r}")
    if not isinstance(n_captions, int) or isinstance(n_captions, bool) or n_captions < 1:
        raise ZooError(f"--n-captions must be a positive integer, got {n_captions!r}")
    _check_batch_size(batch_size)
    if isinstance(captioner, str):
        captioner = build_captioner(captioner)
    if n_captions > 1 and getattr(captioner, "generation", None) in ("greedy", "beam"):
        raise ZooError(f"--n-captions {n_captions} with {captioner.generation} generation gives the same caption "
                       f"{n_captions} times; use a sampling generation (top_p, top_k) or --n-captions 1")
    url_list = _urls(urls)
    out = _prepare_out(out, url_list)
    counts: Counter = Counter()
    keys = _Keys()
    stats = {"samples": 0, "captions": 0, "empty": 0}
    example: list[str] = []

    def flush(pending: list[tuple[dict[str, Any], dict[str, Any], torch.Tensor]]) -> Iterator[dict[str, Any]]:
        images = torch.stack([p[2] for p in pending]).repeat_interleave(n_captions, dim=0)
        texts = list(captioner(images))
        if len(texts) != len(images) or not all(isinstance(t, str) for t in texts):
            raise ZooError(f"captioner {getattr(captioner, 'name', captioner)!r} returned {len(texts)} captions for "
                           f"{len(images)} images; a Captioner returns one string per image")
        for i, (raw, meta, _) in enumerate(pending):
            generated = [" ".join(t.split()) for t in texts[i * n_captions : (i + 1) * n_captions]]
            kept = [t for t in generated if t]
            stats["empty"] += len(generated) - len(kept)
            stats["captions"] += len(kept)
            stats["samples"] += 1
            if not example:
                example.extend(kept)
            old = meta.get("captions")
            captions = {**(old if isinstance(old, Mapping) else {}), name: kept}
            yield _out_sample(raw, keys(str(raw["__key__"])), {**meta, "captions": captions})

    def samples() -> Iterator[dict[str, Any]]:
        pending: list[tuple[dict[str, Any], dict[str, Any], torch.Tensor]] = []
        for raw in iter_raw_samples(url_list, counts):
            try:
                sample = decode_sample(raw, ("image",), ())
            except FieldError as e:
                counts[e.reason] += 1
                continue
            meta = _read_meta(raw, counts)
            if meta is None:  # a json member that is not an object: nowhere to put captions
                continue
            pending.append((raw, meta, captioner.transform(sample["image"])))
            if len(pending) == batch_size:
                yield from flush(pending)
                pending = []
        if pending:
            yield from flush(pending)

    op = {"op": "recaption", "captioner": getattr(captioner, "name", type(captioner).__name__), "name": name,
          "n_captions": n_captions}
    shards = write_shards(samples(), out, maxcount=maxcount, total=known_size(url_list), desc="captioning",
                          info=_dataset_info(url_list, urls, op))
    if stats["empty"]:
        log.warning("%d generated captions were empty and left out", stats["empty"])
    return {**op, **stats, "skipped": dict(counts), "renamed_keys": keys.renamed, "example": example,
            "out": str(out), "shards": len(shards)}


__all__ = [
    "PairScore",
    "Scores",
    "score_pairs",
    "score_shards",
    "summarize",
    "write_sidecars",
    "read_scores",
    "find_sidecars",
    "sidecar_name",
    "filter_shards",
    "keep_count",
    "Captioner",
    "CocaCaptioner",
    "CAPTIONERS",
    "build_captioner",
    "coca_captioner",
    "recaption",
    "default_tokenizer",
]
