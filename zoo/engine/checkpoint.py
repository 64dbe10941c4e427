"""Training checkpoints: written atomically, the last K kept, read back with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values only (model, optimizer, scaler, step,
epoch, batches consumed in the epoch, RNG states, a fingerprint of the recipe), so it loads
without unpickling code. A failed write (disk full, a kill) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(ZooError):
    """A checkpoint that cannot be written or does not belong to this run."""


def rng_state() -> dict[str, Any]:
    """Every random stream the training loop draws from in this process."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """This run's checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep_last: int = 2) -> Path:
    """Write `state` as step_NNNNNNNNN.pt through a temporary file and a rename, then prune to `keep_last`."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {path.name} ({e.strerror or e}); "
            f"the previous checkpoint is intact: {previous.name if previous else 'none'}. Free disk space and --resume"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain values only); refuse one from another recipe."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises several types for corrupt or foreign files)
        raise CheckpointError(f"{path} is not a readable zoo checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a zoo training checkpoint (no 'step'/'model' entries)")
    if fingerprint is not None and state.get("fingerprint") not in (None, fingerprint):
        raise CheckpointError(
            f"{path} was written by another recipe (method, model, batch size or distributed strategy differ); "
            "resume with the recipe that wrote it, or start a new run directory"
        )
    return state
