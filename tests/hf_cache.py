"""A Hugging Face hub cache laid out by hand, so hf-hub: names resolve offline in tests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def make_hf_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str | None = None,
                  link: bool = False) -> str:
    """A Hugging Face hub cache entry as huggingface_hub lays it out; returns the commit hash. `link=True` puts
    symlinks to the given files in the snapshot (as the hub's own cache does, to its blobs) instead of copies."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if link and isinstance(content, Path):
            (snap / name).symlink_to(content.resolve())
            continue
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        (snap / name).write_bytes(data)
    return commit
