"""Linear probes on frozen features.

`linear_probe` trains a DINOv2-style grid — feature variants x learning rates — in one pass
over cached features, selects the best configuration on a held-out part of the TRAIN set
(never on val), retrains it on all of train, and reports it on val. `logistic_regression` is
an L-BFGS solver for small sets, its L2 strength chosen the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.schedule import warmup_cosine
from zoo.errors import ZooError

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass
class ProbeResult:
    """The chosen configuration, its val top-1 (%), and the held-out accuracy of every configuration."""

    best: dict[str, object]
    top1: float
    grid: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"best": self.best, "top1": self.top1, "grid": self.grid}


def heldout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a stratified split of the train set, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def _train_grid(
    feats: Sequence[torch.Tensor], labels: torch.Tensor, lrs: Sequence[float], num_classes: int,
    epochs: int, batch_size: int, seed: int,
) -> list[list[nn.Linear]]:
    """heads[v][l]: one linear head per (feature variant v, learning rate l), all trained together:
    SGD momentum 0.9, no weight decay, per-step cosine schedule, summed cross-entropies."""
    g = torch.Generator().manual_seed(seed)
    heads = [[nn.Linear(f.shape[1], num_classes) for _ in lrs] for f in feats]
    for row in heads:
        for h in row:
            nn.init.normal_(h.weight, std=0.01, generator=g)
            nn.init.zeros_(h.bias)
    groups = [{"params": list(h.parameters()), "lr": lr, "base_lr": lr} for row in heads for h, lr in zip(row, lrs)]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    n = len(labels)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, group["base_lr"])
            loss = sum(F.cross_entropy(h(f[idx]), labels[idx]) for f, row in zip(feats, heads) for h in row)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return heads


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (head(x).argmax(1) == y).float().mean().item() if len(y) else float("nan")


def _check_labels(train_labels: torch.Tensor, val_labels: torch.Tensor) -> int:
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise ZooError("linear probe needs non-empty train and val splits")
    tr, va = set(train_labels.tolist()), set(val_labels.tolist())
    if not tr & va:
        raise ZooError(f"train and val share no label (train {sorted(tr)[:5]}..., val {sorted(va)[:5]}...): check the splits")
    return int(max(tr | va)) + 1


def linear_probe(
    train: Mapping[str, torch.Tensor] | torch.Tensor,
    train_labels: torch.Tensor,
    val: Mapping[str, torch.Tensor] | torch.Tensor,
    val_labels: torch.Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 30,
    batch_size: int = 256,
    heldout: float = 0.2,
    seed: int = 0,
) -> ProbeResult:
    """Grid of linear heads over feature variants (`{"cls": ..., "cls+avg": ...}` or one tensor)
    x `lrs`, selected on a held-out `heldout` fraction of train, reported as val top-1 (%)."""
    if isinstance(train, torch.Tensor):
        train, val = {"features": train}, {"features": val}
    if set(train) != set(val):
        raise ZooError(f"train and val have different feature variants: {sorted(train)} vs {sorted(val)}")
    train_labels, val_labels = train_labels.long(), val_labels.long()
    num_classes = _check_labels(train_labels, val_labels)
    names = sorted(train)
    fit, held = heldout_split(train_labels, heldout, seed)
    if len(held) == 0:
        raise ZooError("the train split is too small to hold out samples for model selection")
    feats_fit, feats_held = [], []
    for n in names:
        a, b = _standardize(train[n][fit].float(), train[n][held].float())
        feats_fit.append(a)
        feats_held.append(b)
    heads = _train_grid(feats_fit, train_labels[fit], lrs, num_classes, epochs, batch_size, seed)
    grid = [
        {"features": n, "lr": lr, "heldout_top1": _accuracy(h, x, train_labels[held])}
        for n, x, row in zip(names, feats_held, heads)
        for lr, h in zip(lrs, row)
    ]
    best = max(grid, key=lambda r: (r["heldout_top1"], -abs(math.log10(r["lr"]) + 2)))
    # retrain the chosen configuration on all of train, then touch val once
    xtr, xva = _standardize(train[best["features"]].float(), val[best["features"]].float())
    head = _train_grid([xtr], train_labels, [best["lr"]], num_classes, epochs, batch_size, seed)[0][0]
    return ProbeResult(best=dict(best), top1=_accuracy(head, xva, val_labels), grid=grid)


def logistic_regression(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    heldout: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> ProbeResult:
    """Multinomial logistic regression by L-BFGS (full batch): for small sets; L2 picked on held-out train."""
    train_labels, val_labels = train_labels.long(), val_labels.long()
    num_classes = _check_labels(train_labels, val_labels)
    fit, held = heldout_split(train_labels, heldout, seed)

    def solve(x: torch.Tensor, y: torch.Tensor, l2: float) -> nn.Linear:
        head = nn.Linear(x.shape[1], num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return head

    xf, xh = _standardize(train[fit].float(), train[held].float())
    grid = [{"l2": l2, "heldout_top1": _accuracy(solve(xf, train_labels[fit], l2), xh, train_labels[held])} for l2 in l2_grid]
    best = max(grid, key=lambda r: (r["heldout_top1"], r["l2"]))
    xtr, xva = _standardize(train.float(), val.float())
    head = solve(xtr, train_labels, best["l2"])
    return ProbeResult(best=dict(best), top1=_accuracy(head, xva, val_labels), grid=grid)
