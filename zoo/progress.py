"""Progress bars: tqdm, quiet when output is not a terminal or when CI=true."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """Bars only for a person watching a terminal."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that follows `progress_enabled()` unless `disable=` is given."""
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
