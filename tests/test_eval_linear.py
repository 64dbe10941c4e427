"""Linear probes: they learn separable data, match a cross-validated logistic regression where the
old SGD grid under-fits, are deterministic, and model selection never looks at val."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.eval import linear
from zoo.eval.linear import heldout_split, linear_probe, logistic_regression, stratified_folds


def separable(n_per_class=40, classes=4, dim=16, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat(n_per_class)
    return w[y] + noise * torch.randn(len(y), dim, generator=g), y


def few_digits(per_class: int, seed: int):
    """Raw 8x8 digit pixels: `per_class` train samples per class, and the built-in digits' whole val split."""
    from sklearn.datasets import load_digits

    from zoo.data.builtin.digits import split_indices

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    split = split_indices()
    train, val = torch.from_numpy(split["train"]), torch.from_numpy(split["val"])
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([train[y[train] == c][torch.randperm(int((y[train] == c).sum()), generator=g)[:per_class]]
                     for c in range(10)])
    return x[idx], y[idx], x[val], y[val]


def cv_logistic_regression(xtr, ytr, xva, yva) -> float:
    """The reference: multinomial logistic regression (lbfgs, converged), C by 5-fold CV, standardized features."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegressionCV(Cs=np.logspace(-4, 4, 9), cv=5, max_iter=1000).fit(scaler.transform(xtr.numpy()), ytr.numpy())
    return 100.0 * float((model.predict(scaler.transform(xva.numpy())) == yva.numpy()).mean())


def test_linear_probe_learns_separable_features():
    xtr, ytr = separable(seed=0)
    xva, yva = separable(n_per_class=10, seed=0)
    res = linear_probe({"good": xtr, "noise": torch.randn_like(xtr)}, ytr, {"good": xva, "noise": torch.randn_like(xva)}, yva)
    assert res.top1 >= 97.0
    assert res.best["features"] == "good" and res.best["solver"] == "lbfgs"
    assert {r["features"] for r in res.grid} == {"good", "noise"}
    strengths = [r["weight_decay"] for r in res.grid if r["features"] == "good"]
    assert strengths == sorted(strengths, reverse=True)  # the L2 path runs strong to weak


def test_sgd_grid_is_still_there():
    xtr, ytr = separable(seed=0)
    xva, yva = separable(n_per_class=10, seed=0)
    res = linear_probe({"good": xtr, "noise": torch.randn_like(xtr)}, ytr, {"good": xva, "noise": torch.randn_like(xva)}, yva,
                       solver="sgd", epochs=15, lrs=(1e-3, 1e-1))
    assert res.top1 >= 97.0 and res.best["features"] == "good"
    assert len(res.grid) == 4 and {r["lr"] for r in res.grid} == {1e-3, 1e-1}


def test_default_matches_cross_validated_logistic_regression_where_sgd_underfits():
    """10 digits per class as raw pixels: the SGD grid lands points below a converged, CV'd logistic regression."""
    xtr, ytr, xva, yva = few_digits(per_class=10, seed=0)
    ref = cv_logistic_regression(xtr, ytr, xva, yva)
    old = linear_probe(xtr, ytr, xva, yva, solver="sgd").top1
    new = linear_probe(xtr, ytr, xva, yva).top1
    assert old < ref - 2.0, (old, ref)  # the case is one where the old default under-fits
    assert new >= ref - 0.5, (new, ref)


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_same_seed_same_result(solver):
    xtr, ytr = separable(seed=3, noise=2.0)
    xva, yva = separable(n_per_class=10, seed=4, noise=2.0)
    kw = dict(solver=solver, epochs=3) if solver == "sgd" else {}
    a = linear_probe({"a": xtr, "b": xtr[:, :8]}, ytr, {"a": xva, "b": xva[:, :8]}, yva, seed=5, **kw)
    b = linear_probe({"a": xtr, "b": xtr[:, :8]}, ytr, {"a": xva, "b": xva[:, :8]}, yva, seed=5, **kw)
    assert a.as_dict() == b.as_dict()


@pytest.mark.parametrize("folds", [None, 1])
def test_selection_never_touches_val(monkeypatch, folds):
    """Val labels scrambled to nonsense must not change which configuration is chosen."""
    xtr, ytr = separable(seed=1, noise=2.0)
    xva, yva = separable(n_per_class=10, seed=1)
    a = linear_probe(xtr, ytr, xva, yva, folds=folds)
    b = linear_probe(xtr, ytr, xva, yva.flip(0), folds=folds)
    assert a.best == b.best and a.grid == b.grid
    seen = []
    real = linear._accuracy
    monkeypatch.setattr(linear, "_accuracy", lambda h, x, y: seen.append(len(y)) or real(h, x, y))
    linear_probe(xtr, ytr, xva, yva, folds=folds)
    assert seen == [len(yva)]  # val is scored once, at the very end


def test_sgd_selection_never_touches_val():
    xtr, ytr = separable(seed=1)
    xva, yva = separable(n_per_class=10, seed=1)
    a = linear_probe(xtr, ytr, xva, yva, solver="sgd", epochs=5, lrs=(1e-4, 1e-2, 1e-1))
    b = linear_probe(xtr, ytr, xva, yva.flip(0), solver="sgd", epochs=5, lrs=(1e-4, 1e-2, 1e-1))
    assert a.best == b.best and a.grid == b.grid


def test_heldout_split_is_stratified_and_disjoint():
    y = torch.arange(5).repeat(20)
    fit, held = heldout_split(y, 0.2, seed=3)
    assert not set(fit.tolist()) & set(held.tolist()) and len(fit) + len(held) == 100
    assert torch.bincount(y[held]).tolist() == [4] * 5


def test_stratified_folds_partition_the_set():
    y = torch.cat([torch.zeros(12), torch.ones(7), torch.full((3,), 2)]).long()
    folds = stratified_folds(y, 5, seed=0)
    held = torch.cat([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(y)))  # every sample held out exactly once
    for fit, h in folds:
        assert not set(fit.tolist()) & set(h.tolist()) and len(fit) + len(h) == len(y)
        assert abs(len(h) - len(y) / 5) < 1
    assert [int((y[h] == 0).sum()) for _, h in folds] == [3, 3, 2, 2, 2]  # each class spread evenly


def test_lbfgs_heads_are_independent_and_reach_the_optimum():
    """Two heads with different L2 strengths in one batch land where each one's own solve (torch LBFGS) does."""
    x, y = separable(n_per_class=30, classes=3, dim=6, seed=7, noise=3.0)
    x = (x - x.mean(0)) / x.std(0)  # as the probe sees features: standardized
    wds = torch.tensor([1e-1, 1e-3])
    weights = torch.full((len(y), 2), 1.0 / len(y))
    objective = lambda th: linear._softmax_objective(x, y, weights, wds, th)  # noqa: E731
    theta = linear._lbfgs(objective, torch.zeros(2, 7, 3), torch.ones(1, 7, 1), max_iter=200, tol=1e-7)
    losses, _ = objective(theta)
    for h, wd in enumerate(wds.tolist()):
        w = torch.zeros(6, 3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert abs(losses[h].item() - closure().item()) < 1e-5
        assert torch.allclose(theta[h, :-1], w.detach(), atol=5e-3)
        bias = theta[h, -1]  # softmax ignores a shift shared by all classes: compare centred biases
        assert torch.allclose(bias - bias.mean(), (b - b.mean()).detach(), atol=5e-3)


def test_softmax_objective_gradient_matches_autograd():
    x, y = separable(n_per_class=5, classes=3, dim=4, seed=2)
    weights = torch.rand(len(y), 2)
    wd = torch.tensor([0.3, 0.01])
    theta = torch.randn(2, 5, 3, requires_grad=True)
    loss, grad = linear._softmax_objective(x, y, weights, wd, theta.detach(), chunk_elems=12)  # several chunks
    z = torch.einsum("nd,hdc->nhc", x, theta[:, :-1]) + theta[:, -1]
    ce = -z.log_softmax(2).gather(2, y.view(-1, 1, 1).expand(-1, 2, 1)).squeeze(2)
    ref = (ce * weights).sum(0) + 0.5 * wd * theta[:, :-1].pow(2).sum((1, 2))
    ref.sum().backward()
    assert torch.allclose(loss, ref.detach(), atol=1e-5) and torch.allclose(grad, theta.grad, atol=1e-5)


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
    with pytest.raises(ZooError, match="solver"):
        linear_probe(x, y, x, y, solver="adam")
    with pytest.raises(ZooError, match="too small"):
        linear_probe(x[:1], y[:1], x, y, folds=1)
