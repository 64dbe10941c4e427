"""The weights lock file: the sha256 of every unpinned release file as first downloaded, like pip's hashes.

`zoo.lock` is JSON: `{"format": "zoo.lock/1", "weights": {NAME: {"source", "sha256", "size", "recorded"}}}`.
Which file: `$ZOO_LOCK` if set, else the nearest `zoo.lock` in the working directory or a parent (a project's,
committed with its code so every machine checks the same bytes), else `$ZOO_HOME/zoo.lock`. The hub records a
file's hash the first time it downloads it and verifies every later load against the record; `zoo lock` manages
the file. Writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.errors import ChecksumError, ConfigError
from zoo.home import zoo_home

LOCK_NAME = "zoo.lock"
LOCK_FORMAT = "zoo.lock/1"


@dataclass(frozen=True)
class LockRecord:
    name: str
    source: str
    sha256: str
    size: int | None = None
    recorded: str | None = None


def lock_path(start: str | Path | None = None) -> Path:
    """The lock file in use: `$ZOO_LOCK`, the nearest project `zoo.lock` (from `start`, default the working
    directory, upwards), or `$ZOO_HOME/zoo.lock`; it need not exist yet."""
    if os.environ.get("ZOO_LOCK"):
        return Path(os.environ["ZOO_LOCK"]).expanduser()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / LOCK_NAME).is_file():
            return folder / LOCK_NAME
    return zoo_home() / LOCK_NAME


def read(path: str | Path | None = None) -> dict[str, LockRecord]:
    """The records of a lock file (none if it does not exist)."""
    path = Path(path) if path is not None else lock_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix it or delete it to record the hashes again") from None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT or not isinstance(data.get("weights"), dict):
        raise ConfigError(f"{path} is not a zoo lock file (expected {{\"format\": \"{LOCK_FORMAT}\", \"weights\": "
                          "{...}}); move it aside or set ZOO_LOCK to another path")
    out = {}
    for name, rec in data["weights"].items():
        if not isinstance(rec, dict) or not {"source", "sha256"} <= set(rec):
            raise ConfigError(f"{path}: the record of {name!r} needs source and sha256; run `zoo lock {name} --update`")
        out[name] = LockRecord(name=name, source=rec["source"], sha256=rec["sha256"], size=rec.get("size"),
                               recorded=rec.get("recorded"))
    return out


def _write(path: Path, records: dict[str, LockRecord]) -> None:
    body = {"format": LOCK_FORMAT, "weights": {
        n: {k: v for k, v in (("source", r.source), ("sha256", r.sha256), ("size", r.size), ("recorded", r.recorded))
            if v is not None}
        for n, r in sorted(records.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lookup(name: str, source: str, path: str | Path | None = None) -> LockRecord | None:
    """The record of `name`, checked to be of the same source (a changed source makes the hash meaningless)."""
    path = Path(path) if path is not None else lock_path()
    rec = read(path).get(name)
    if rec is not None and rec.source != source:
        raise ChecksumError(f"{name}: {path} locked it from {rec.source}, but its source is now {source}; "
                            f"re-lock it with `zoo lock {name} --update`")
    return rec


def record(name: str, source: str, sha256: str, size: int | None = None, path: str | Path | None = None) -> Path:
    """Write (or replace) the record of `name`; returns the lock file's path."""
    path = Path(path) if path is not None else lock_path()
    records = read(path)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records[name] = LockRecord(name=name, source=source, sha256=sha256, size=size, recorded=now)
    _write(path, records)
    return path


def mismatch_message(name: str, file: Any, actual: str, expected: str, where: str, fix: str) -> str:
    """The one-line error of a file that is not the one pinned or locked, naming both hashes."""
    return f"{name}: {file} has sha256 {actual}, but {where} expects {expected}; {fix}"
