"""The frozen-feature protocols on one labelled task, in one call: what `zoo demo` reports and what
the engine runs on a run's final backbone (`eval.final`) before it writes the numbers into the card.

    evaluate(model, "digits/train/*.tar", "digits/val/*.tar", protocols=("knn", "linear"))
    -> {"knn_top1": 86.9, "linear_top1": 96.4}
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn

from zoo.errors import ZooError
from zoo.eval.features import extract_features
from zoo.eval.knn import knn_eval
from zoo.eval.linear import linear_probe

PROTOCOLS = ("knn", "linear")


def evaluate(
    model: nn.Module,
    train: str | list[str],
    val: str | list[str],
    *,
    protocols: Sequence[str] = PROTOCOLS,
    k: int = 20,
    temperature: float = 0.07,
    epochs: int = 30,
    cache_dir: str | Path | None = None,
    desc: str = "features",
) -> dict[str, float]:
    """kNN top-1 (k, temperature: DINO's weighted vote on the class token) and the linear-probe grid's
    val top-1 (class token and class token + mean patch token, selected on held-out train), in %."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ZooError(f"unknown eval protocol {unknown[0]!r}; valid: {', '.join(PROTOCOLS)}")
    variants = ("cls", "cls+avg") if "linear" in protocols and getattr(model, "num_prefix_tokens", 0) else ("cls",)
    kw = dict(variants=variants, batch_size=256, cache_dir=cache_dir)
    xtr, ytr = extract_features(model, train, desc=f"{desc} (train)", **kw)
    xva, yva = extract_features(model, val, desc=f"{desc} (val)", **kw)
    out: dict[str, float] = {}
    if "knn" in protocols:
        out["knn_top1"] = knn_eval(xtr["cls"], ytr, xva["cls"], yva, ks=(k,), temperature=temperature)[f"top1_k{k}"]
    if "linear" in protocols:
        out["linear_top1"] = linear_probe(xtr, ytr, xva, yva, epochs=epochs).top1
    return out


__all__ = ["evaluate", "PROTOCOLS"]
