"""Where zoo keeps its files: `$ZOO_HOME`, default `~/.cache/zoo` (the model store, downloads, data and feature
caches, and the default weights lock file)."""

from __future__ import annotations

import os
from pathlib import Path


def zoo_home() -> Path:
    """Root of the zoo store and download cache: `$ZOO_HOME`, default `~/.cache/zoo`."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo").expanduser()
