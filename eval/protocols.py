"""The frozen-feature protocols on one labelled task, in one call: what `zoo demo` reports and what
the engine runs on a run's final backbone (`eval.final`) before it writes the numbers into the card.

    evaluate(model, "digits/train/*.tar", "digits/val/*.tar", protocols=("knn", "linear"))
    -> {"knn_top1": 86.9, "linear_top1": 96.4}
    evaluate(model, ..., k=(20, 10), linear_variants=("cls", "cls+avg", "spaced4"))   # POA's protocol
    -> {"knn_top1": 86.9, "knn_top1_k10": 86.1, "linear_top1": 96.8}     # knn_top1 is at the first k
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
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    linear_variants: Sequence[str] | None = None,
    epochs: int = 30,
    cache_dir: str | Path | None = None,
    label_field: str = "label",
    desc: str = "features",
) -> dict[str, float]:
    """kNN top-1 (k, temperature: DINO's weighted vote on the class token; with several k, `knn_top1` is
    the first's and each other k gives `knn_top1_k{k}`) and the linear probe's val top-1 over `linear_variants`
    (default: class token, and class token + mean patch token; POA adds `spaced4`, the class tokens of 4
    evenly spaced blocks), the variant and strength selected on held-out train, in %. `label_field`: the
    integer field to classify (e.g. `fine`, a coarse dataset's fine classes)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ZooError(f"unknown eval protocol {unknown[0]!r}; valid: {', '.join(PROTOCOLS)}")
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(int(v) < 1 for v in ks):
        raise ZooError(f"kNN needs k >= 1 (one value or a list), got {k!r}")
    has_tokens = bool(getattr(model, "num_prefix_tokens", 0))
    probe = tuple(linear_variants) if linear_variants else ("cls", "cls+avg") if has_tokens else ("cls",)
    variants = tuple(dict.fromkeys(("cls",) + (probe if "linear" in protocols else ())))
    kw = dict(variants=variants, batch_size=256, cache_dir=cache_dir, label_field=label_field)
    xtr, ytr = extract_features(model, train, desc=f"{desc} (train)", **kw)
    xva, yva = extract_features(model, val, desc=f"{desc} (val)", **kw)
    out: dict[str, float] = {}
    if "knn" in protocols:
        res = knn_eval(xtr["cls"], ytr, xva["cls"], yva, ks=tuple(ks), temperature=temperature)
        out["knn_top1"] = res[f"top1_k{ks[0]}"]
        out.update({f"knn_top1_k{v}": res[f"top1_k{v}"] for v in ks[1:]})
    if "linear" in protocols:
        out["linear_top1"] = linear_probe({v: xtr[v] for v in probe}, ytr, {v: xva[v] for v in probe}, yva,
                                          epochs=epochs).top1
    return out


__all__ = ["evaluate", "PROTOCOLS"]
