"""Shard lists and their recorded sizes.

Patterns: brace expansion (`train-{000..015}.tar`), shell globs for local files (`/data/*.tar`), and
`::` to join several sources (`a/{0..9}.tar::b/{0..3}.tar`). Sample counts come from the files
every reader writes beside its shards: open_clip `sizes.json`, timm `_info.json`, img2dataset
`NNNNN_stats.json`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

import braceexpand

from zoo.errors import DataError

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://", "hf://", "ais://", "sftp://", "scp://")


def expand_sources(pattern: str | list[str]) -> list[list[str]]:
    """Shard URLs per `::`-separated source, braces and (local) globs expanded; fails fast on a miss."""
    if isinstance(pattern, (list, tuple)):
        parts = [list(pattern)]
    else:
        parts = []
        for source in str(pattern).split("::"):
            urls: list[str] = []
            for u in braceexpand.braceexpand(os.path.expandvars(source)):
                if u.startswith(REMOTE_PREFIXES):
                    urls.append(u)
                elif any(c in u for c in "*?["):
                    urls.extend(sorted(glob.glob(os.path.expanduser(u))))
                else:
                    urls.append(os.path.expanduser(u))
            parts.append(urls)
    for source, urls in zip(str(pattern).split("::") if isinstance(pattern, str) else ["(list)"], parts):
        if not urls:
            raise DataError(f"no shard matches {source!r}; check the path and the brace/glob pattern")
        missing = [u for u in urls if not u.startswith(REMOTE_PREFIXES) and not os.path.isfile(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}{more}; check the path and the brace range in {source!r}")
    return parts


# -- sizes ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


_FOLDER_SIZES: dict[Path, tuple[tuple, dict[str, int]]] = {}


def _folder_sizes(folder: Path) -> dict[str, int]:
    """Shard name -> recorded count from a folder's sizes.json (first) and _info.json, cached until either changes."""
    stamp = (_stamp(folder / "sizes.json"), _stamp(folder / "_info.json"))
    hit = _FOLDER_SIZES.get(folder)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    table: dict[str, int] = {}
    info = _read_json(folder / "_info.json") if stamp[1] else None
    if isinstance(info, dict) and isinstance(info.get("splits"), dict):
        for split in info["splits"].values():
            if isinstance(split, dict):
                for name, n in zip(split.get("filenames") or (), split.get("shard_lengths") or ()):
                    if _int_or_none(n) is not None:
                        table[Path(str(name)).name] = int(n)
    sizes = _read_json(folder / "sizes.json") if stamp[0] else None
    if isinstance(sizes, dict):
        table.update({str(k): int(v) for k, v in sizes.items() if _int_or_none(v) is not None})
    _FOLDER_SIZES[folder] = (stamp, table)
    return table


def recorded_size(url: str) -> int | None:
    """The sample count recorded beside one local shard: open_clip `sizes.json`, timm `_info.json` or
    img2dataset `NNNNN_stats.json`, in that order; None when there is none (or the shard is remote)."""
    if url.startswith(REMOTE_PREFIXES):
        return None
    path = Path(url)
    n = _folder_sizes(path.parent).get(path.name)
    if n is None:
        stats = _read_json(path.parent / (path.name.removesuffix(".tar") + "_stats.json"))
        if isinstance(stats, dict):
            n = _int_or_none(stats.get("successes"))
    return n


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Sample count of each shard from metadata beside them (see `recorded_size`); None unless the
    shards share one folder and every one of them has a count."""
    if len({Path(u).parent for u in urls}) != 1:
        return None
    sizes = [recorded_size(u) for u in urls]
    return None if any(n is None for n in sizes) else sizes


def known_size(urls: list[str]) -> int | None:
    """Sample count of these shards from their metadata (see `shard_sizes`), or None."""
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes)
