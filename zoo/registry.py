"""Name -> factory registries (models, recipes, datasets) with wildcard listing and
close-match suggestions, so a typo gets a useful error instead of a bare KeyError."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from zoo.errors import UnknownNameError


@dataclass(frozen=True)
class Entry:
    """One registered name: its factory and free-form metadata (family, defaults, paper...)."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)


def close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """The registered names a user most likely meant by `name`."""
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(found) < n:  # also offer names that share the typed text as a substring
        low = name.lower()
        found += [c for c in candidates if low and low in c.lower() and c not in found][: n - len(found)]
    return found


def matching(names: list[str], pattern: str | None) -> list[str]:
    """The names a shell-style wildcard (`vit_*_patch4_*`) matches, or that contain a plain substring."""
    if not pattern:
        return list(names)
    pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, pat)]


class Registry:
    """A named table of factories. `register` is usable as a decorator.

    `provider` names the module whose import registers the entries (`zoo.recipes` for RECIPES): it is
    imported on the first lookup, so lower layers (the engine) find the methods without importing them.
    """

    def __init__(self, kind: str, provider: str | None = None, listed_by: str = "zoo list"):
        self.kind = kind
        self.provider = provider
        self.listed_by = listed_by
        self._entries: dict[str, Entry] = {}

    def _populate(self) -> None:
        if self.provider is not None:
            provider, self.provider = self.provider, None
            importlib.import_module(provider)

    def register(self, name: str | None = None, factory: Callable[..., Any] | None = None, **meta: Any):
        """Register `factory` under `name` (default: the factory's __name__)."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._entries and self._entries[key].factory is not fn:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = Entry(key, fn, dict(meta))
            return fn

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Entry:
        self._populate()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str, extra_candidates: list[str] | None = None) -> str:
        candidates = list(self._entries) + list(extra_candidates or [])
        hint = close_matches(name, candidates)
        msg = f"unknown {self.kind} {name!r}"
        if hint:
            msg += f"; did you mean: {', '.join(hint)}?"
        return msg + f" (`{self.listed_by}` shows all {len(candidates)} names)"

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name).factory(**kwargs)

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a shell-style wildcard (`vit_*_patch4_*`)."""
        self._populate()
        return matching(sorted(self._entries), pattern)

    def __contains__(self, name: object) -> bool:
        self._populate()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._populate()
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        self._populate()
        return len(self._entries)


MODELS = Registry("model")
RECIPES = Registry("recipe", provider="zoo.recipes", listed_by="zoo recipes")
DATASETS = Registry("dataset")
