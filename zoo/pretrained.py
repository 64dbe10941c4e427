"""The pretrained table: official weights by zoo name (`arch.tag`), like timm's `default_cfgs`.

Each entry says where the release's file is (`hf-hub:` repo + file + revision, a URL, or `manual` for a file no
URL fetches, with where to get it and the `zoo convert` command for it), which converter turns its tensors into a
zoo model, the preprocessing it was trained with, its license and paper, and the numbers its authors reported.
The table is data (`zoo/models/pretrained.yaml`); `zoo.register_weights` adds entries at run time. Fetching,
pinning and converting are the hub's (`zoo.hub.load`); the sha256 a file is held to comes from the entry or,
for an unpinned one, from the lock file (`zoo.lock`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from zoo.errors import ConfigError, UnknownNameError
from zoo.registry import close_matches, matching

TABLE_FILE = Path(__file__).parent / "models" / "pretrained.yaml"
MANUAL = "manual"

# How a release's file becomes a zoo model (implemented in zoo.hub, which reads the file).
CONVERTERS: dict[str, str] = {
    "auto": "whatever zoo.load reads from the file itself (a zoo card, or a weights file with arch=)",
    "timm_vit": "a timm VisionTransformer state dict -> the zoo ViT of the same shape (same keys, same forward)",
    "timm": "timm builds its own architecture and loads the file (models the zoo ViT does not cover)",
    "open_clip": "an open_clip CLIP state dict -> zoo's whole CLIP (open_clip's modules, zero-shot ready)",
    "open_clip_visual": "an open_clip CLIP state dict's visual.* -> zoo's CLIP image tower",
    "dit": "an official DiT checkpoint (its ema weights first) -> zoo's DiT (diffusers' DiTTransformer2DModel)",
    "unip": "an official UNIP checkpoint -> a zoo ViT whose last block keeps the teacher's head count",
    "flame": "an official FLAME training checkpoint -> zoo's FLAME image side (the frozen LLM dropped)",
    "poa": "an official POA teacher checkpoint -> the plain ViT of one width and depth (args width, depth)",
}


@dataclass(frozen=True)
class PretrainedEntry:
    """One named release: its source, converter, preprocessing, provenance and reported numbers."""

    name: str
    source: str  # hf-hub:ORG/REPO, http(s)://URL, a local path, or "manual"
    converter: str = "auto"
    file: str | None = None  # the file in a hf-hub repo
    revision: str = "main"  # a hf-hub branch, tag or commit
    sha256: str | None = None  # known hash of the file: verified before use
    arch: str | None = None  # the architecture to build, when not the name's own
    args: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    paper: str | None = None
    origin: str | None = None
    reported: dict[str, Any] = field(default_factory=dict)
    reported_by: str | None = None
    manual: dict[str, str] | None = None  # {where, convert} for a release no URL fetches
    registered: bool = False  # added at run time (zoo.register_weights), not from the table

    @property
    def is_manual(self) -> bool:
        return self.source == MANUAL

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None

    @property
    def build_arch(self) -> str:
        return self.arch or self.name.partition(".")[0]

    @property
    def location(self) -> str:
        """The file's address in one string: `hf-hub:REPO/FILE@REV`, the URL, or `manual`."""
        if self.source.startswith("hf-hub:") and self.file:
            rev = "" if self.revision == "main" else f"@{self.revision}"
            return f"{self.source}/{self.file}{rev}"
        return self.source

    def card(self) -> dict[str, Any]:
        """What a model loaded from this entry carries in its card (`model.zoo_card`)."""
        keys = ("license", "paper", "origin", "reported", "reported_by")
        return {"name": self.name, "source": self.location, "converter": self.converter,
                **{k: getattr(self, k) for k in keys if getattr(self, k)}}


_FIELDS = {f.name for f in fields(PretrainedEntry)} - {"name", "registered"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REGISTERED: dict[str, PretrainedEntry] = {}


def make_entry(name: str, spec: dict[str, Any], *, where: str = "", registered: bool = False) -> PretrainedEntry:
    """A checked entry from a table row: unknown keys, converters, sources and hashes are one-line errors."""
    at = f"{where}: " if where else ""
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}pretrained entry {name!r} must be a mapping of fields, got {type(spec).__name__}")
    for key in spec:
        if key not in _FIELDS:
            hint = close_matches(key, sorted(_FIELDS), n=1)
            raise ConfigError(f"{at}pretrained entry {name!r} has unknown field {key!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else f" (fields: {', '.join(sorted(_FIELDS))})"))
    if "source" not in spec:
        raise ConfigError(f"{at}pretrained entry {name!r} has no source (hf-hub:ORG/REPO, a URL, or manual)")
    entry = PretrainedEntry(name=name, registered=registered, **spec)
    if "." not in name:
        raise ConfigError(f"{at}pretrained name {name!r} must be arch.tag (e.g. vit_base_patch16_224.mae)")
    if entry.converter not in CONVERTERS:
        hint = close_matches(entry.converter, list(CONVERTERS), n=1)
        raise ConfigError(f"{at}pretrained entry {name!r}: unknown converter {entry.converter!r}; use one of "
                          f"{', '.join(CONVERTERS)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if entry.sha256 is not None and not _SHA256.match(str(entry.sha256)):
        raise ConfigError(f"{at}pretrained entry {name!r}: sha256 must be 64 lowercase hex digits, got {entry.sha256!r}")
    if entry.is_manual:
        if not entry.manual or not {"where", "convert"} <= set(entry.manual):
            raise ConfigError(f"{at}pretrained entry {name!r} is manual: give manual.where (where to get the file) "
                              "and manual.convert (the zoo convert command)")
    elif entry.source.startswith("hf-hub:") and not entry.file:
        raise ConfigError(f"{at}pretrained entry {name!r}: a hf-hub source needs `file` (the file in the repo)")
    return entry


@functools.cache
def _table() -> dict[str, PretrainedEntry]:
    try:
        rows = yaml.safe_load(TABLE_FILE.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{TABLE_FILE} is not valid YAML ({e})") from None
    return {name: make_entry(name, spec, where=str(TABLE_FILE)) for name, spec in rows.items()}


def register(entry: PretrainedEntry) -> None:
    """Add an entry at run time (`zoo.register_weights`); a table name cannot be replaced."""
    if entry.name in _table():
        raise ConfigError(f"{entry.name!r} is in zoo's pretrained table; register your weights under another tag")
    _REGISTERED[entry.name] = entry


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def entries(pattern: str | None = None) -> list[PretrainedEntry]:
    """Every entry (table, then registered), sorted by name, optionally filtered by a wildcard or substring."""
    found = {**_table(), **_REGISTERED}
    return [found[n] for n in matching(sorted(found), pattern)]


def find(name: str) -> PretrainedEntry | None:
    """The entry of `name`, or None."""
    return _REGISTERED.get(name) or _table().get(name)


def get(name: str) -> PretrainedEntry:
    entry = find(name)
    if entry is None:
        hint = close_matches(name, [e.name for e in entries()])
        raise UnknownNameError(f"no pretrained entry {name!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else "")
                               + " (`zoo list --pretrained` shows them)")
    return entry


def format_reported(reported: dict[str, Any]) -> str:
    """`{'in1k_knn_top1': 74.5}` -> 'in1k_knn_top1 74.5'."""
    return ", ".join(f"{k} {v}" for k, v in reported.items()) or "-"
