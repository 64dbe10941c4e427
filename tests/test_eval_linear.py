"""Linear probes: they learn separable data, and model selection never looks at val."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import ZooError
from zoo.eval import linear
from zoo.eval.linear import heldout_split, linear_probe, logistic_regression


def separable(n_per_class=40, classes=4, dim=16, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat(n_per_class)
    return w[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_linear_probe_learns_separable_features():
    xtr, ytr = separable(seed=0)
    xva, yva = separable(n_per_class=10, seed=0)
    res = linear_probe({"good": xtr, "noise": torch.randn_like(xtr)}, ytr, {"good": xva, "noise": torch.randn_like(xva)}, yva,
                       epochs=15, lrs=(1e-3, 1e-1))
    assert res.top1 >= 97.0
    assert res.best["features"] == "good"
    assert len(res.grid) == 4 and {r["features"] for r in res.grid} == {"good", "noise"}


def test_selection_never_touches_val(monkeypatch):
    """Val labels scrambled to nonsense must not change which configuration is chosen."""
    xtr, ytr = separable(seed=1)
    xva, yva = separable(n_per_class=10, seed=1)
    a = linear_probe(xtr, ytr, xva, yva, epochs=5, lrs=(1e-4, 1e-2, 1e-1))
    b = linear_probe(xtr, ytr, xva, yva.flip(0), epochs=5, lrs=(1e-4, 1e-2, 1e-1))
    assert a.best == b.best and a.grid == b.grid
    seen = []
    real = linear._accuracy
    monkeypatch.setattr(linear, "_accuracy", lambda h, x, y: seen.append(len(y)) or real(h, x, y))
    linear_probe(xtr, ytr, xva, yva, epochs=2, lrs=(1e-2, 1e-1))
    assert seen.count(len(yva)) == 1 and seen[-1] == len(yva)  # val is scored once, at the very end


def test_heldout_split_is_stratified_and_disjoint():
    y = torch.arange(5).repeat(20)
    fit, held = heldout_split(y, 0.2, seed=3)
    assert not set(fit.tolist()) & set(held.tolist()) and len(fit) + len(held) == 100
    assert torch.bincount(y[held]).tolist() == [4] * 5


def test_logistic_regression_lbfgs():
    xtr, ytr = separable(n_per_class=30, seed=2)
    xva, yva = separable(n_per_class=10, seed=2)
    res = logistic_regression(xtr, ytr, xva, yva)
    assert res.top1 >= 97.0 and "l2" in res.best


def test_bad_splits():
    x, y = separable()
    with pytest.raises(ZooError, match="share no label"):
        linear_probe(x, y, x[:4], torch.full((4,), 9))
    with pytest.raises(ZooError, match="non-empty"):
        linear_probe(x, y, x[:0], y[:0])
