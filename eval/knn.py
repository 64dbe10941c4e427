"""Weighted kNN classification on frozen features (the DINO protocol, without its limits).

Cosine similarity on L2-normalised features; the top-k neighbours vote with weight exp(s/T),
T = 0.07; several k in one pass; any number of test samples and classes; memory bounded by
chunking both the queries and the train bank (a running top-k merges train chunks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from zoo.errors import ZooError

DEFAULT_KS = (10, 20, 100, 200)


def _check(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> None:
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ZooError(f"kNN needs 2-D features of one width, got train {tuple(train.shape)} and test {tuple(test.shape)}")
    if len(train) != len(train_labels):
        raise ZooError(f"{len(train)} train features but {len(train_labels)} labels")
    if len(train) == 0 or len(test) == 0:
        raise ZooError("kNN needs at least one train and one test sample; the split is empty")


@torch.no_grad()
def topk_neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, *, query_chunk: int = 256, train_chunk: int = 32768
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) of the k most similar train rows for each test row, best first.

    Features must already be L2-normalised. Peak memory ~ query_chunk x (train_chunk + k)."""
    k = min(k, len(train))
    sims, idxs = [], []
    for q0 in range(0, len(test), query_chunk):
        q = test[q0 : q0 + query_chunk]
        best_s = best_i = None
        for t0 in range(0, len(train), train_chunk):
            s = q @ train[t0 : t0 + train_chunk].T
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            i = i + t0
            if best_s is not None:
                s, j = torch.cat([best_s, s], dim=1).topk(k, dim=1)
                i = torch.cat([best_i, i], dim=1).gather(1, j)
            best_s, best_i = s, i
        sims.append(best_s)
        idxs.append(best_i)
    return torch.cat(sims), torch.cat(idxs)


def _prepare(train, train_labels, test, num_classes):
    _check(train, train_labels, test)
    train_labels = train_labels.long()
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    return F.normalize(train.float(), dim=1), train_labels, F.normalize(test.float(), dim=1), num_classes


def _chunk_scores(train, train_labels, q, ks, temperature, num_classes, train_chunk) -> dict[int, torch.Tensor]:
    kmax = min(max(ks), len(train))
    sims, idx = topk_neighbours(train, q, kmax, query_chunk=len(q), train_chunk=train_chunk)
    weights = (sims / temperature).exp()
    labels = train_labels[idx]
    out = {}
    for k in sorted(set(ks)):
        kk = min(k, kmax)
        scores = torch.zeros(len(q), num_classes, dtype=weights.dtype)
        out[k] = scores.scatter_add_(1, labels[:, :kk], weights[:, :kk])
    return out


@torch.no_grad()
def knn_scores(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    query_chunk: int = 256,
    train_chunk: int = 32768,
) -> dict[int, torch.Tensor]:
    """Class scores (N_test, C) for each k: sum over the k nearest of exp(cos/T) per class."""
    train, train_labels, test, num_classes = _prepare(train, train_labels, test, num_classes)
    parts = [
        _chunk_scores(train, train_labels, test[q0 : q0 + query_chunk], ks, temperature, num_classes, train_chunk)
        for q0 in range(0, len(test), query_chunk)
    ]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def knn_predict(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    top: int = 5,
    query_chunk: int = 256,
    train_chunk: int = 32768,
) -> dict[int, torch.Tensor]:
    """The `top` best classes (N_test, top) for each k, best first; memory bounded per query chunk."""
    train, train_labels, test, num_classes = _prepare(train, train_labels, test, num_classes)
    top = min(top, num_classes)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in sorted(set(ks))}
    for q0 in range(0, len(test), query_chunk):
        q = test[q0 : q0 + query_chunk]
        for k, s in _chunk_scores(train, train_labels, q, ks, temperature, num_classes, train_chunk).items():
            preds[k].append(s.topk(top, dim=1).indices)
    return {k: torch.cat(v) for k, v in preds.items()}


def knn_eval(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    **chunks: int,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in % for each k."""
    classes = torch.unique(torch.cat([train_labels, test_labels]))
    unseen = set(torch.unique(test_labels).tolist()) - set(torch.unique(train_labels).tolist())
    if unseen:
        raise ZooError(
            f"test labels {sorted(unseen)[:10]} never occur in train: kNN cannot predict them; check the splits"
        )
    num_classes = int(classes.max()) + 1
    preds = knn_predict(train, train_labels, test, ks=ks, temperature=temperature, num_classes=num_classes, **chunks)
    results: dict[str, float] = {}
    test_labels = test_labels.long()
    for k, ranked in preds.items():
        results[f"top1_k{k}"] = 100.0 * (ranked[:, 0] == test_labels).float().mean().item()
        if len(classes) >= 5:
            results[f"top5_k{k}"] = 100.0 * (ranked == test_labels[:, None]).any(1).float().mean().item()
    return results
