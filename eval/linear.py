"""Linear probes on frozen features.

`linear_probe` fits, per feature variant, multinomial logistic regression by full-batch L-BFGS
along a path of L2 strengths (strong to weak, warm-started), picks the variant and strength on the
TRAIN set alone (k-fold cross-validation when a held-out part would be small, one held-out split
otherwise; never val), refits it on all of train and reports it on val. Solving in the principal
axes of the standardized features, with a preconditioner built from their variances, makes it
converge in tens of iterations even on the ill-conditioned features of a random or early backbone,
where a fixed SGD schedule under-fits. `solver="sgd"` keeps the earlier DINOv2-style grid of SGD
heads (feature variants x learning rates). `logistic_regression` is the L-BFGS solver on one tensor;
`fit_linear_head` returns its head, to classify new data.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.schedule import warmup_cosine

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
# L2 strengths of the L-BFGS path, strong to weak: mean cross-entropy + wd/2 * |W|^2 (bias unpenalized)
DEFAULT_WEIGHT_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
SOLVERS = ("lbfgs", "sgd")
# below this many held-out samples a single split is a noisy judge: cross-validate instead
CV_BELOW_HELDOUT = 1000
# below this many multiply-adds per pass (rows x dims x heads x classes), ops are too short to share
# between threads: a second thread gains nothing, and on a busy machine waiting for it costs 10-50x
ONE_THREAD_BELOW = 1 << 26


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


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k (fit indices, held-out indices) pairs whose held-out parts partition the set, each class spread evenly."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    offset = 0
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = (torch.arange(len(idx)) + offset) % k
        offset += len(idx)  # the next class starts where this one stopped: fold sizes stay within one
    return [(torch.nonzero(fold != f).flatten(), torch.nonzero(fold == f).flatten()) for f in range(k)]


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


# ---------------------------------------------------------------- L-BFGS over a batch of heads


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head inner products of (H, D, C) tensors: (H,)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _softmax_objective(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, wd: torch.Tensor,
                       theta: torch.Tensor, chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head loss sum_i weights[i, h] * CE(x_i W_h + b_h, y_i) + wd_h/2 |W_h|^2 and its gradient.

    theta is (H, D+1, C): W_h = theta[h, :-1], bias b_h = theta[h, -1] (unpenalized). All heads share
    one matrix product; rows go in chunks so memory stays bounded for any N."""
    h, d1, c = theta.shape
    w_flat = theta[:, :-1].transpose(0, 1).reshape(d1 - 1, h * c)
    b_flat = theta[:, -1].reshape(1, h * c)
    loss = 0.5 * wd * theta[:, :-1].pow(2).sum((1, 2))
    gw, gb = torch.zeros(d1 - 1, h * c), torch.zeros(h * c)
    chunk = max(1, chunk_elems // (h * c))
    for i in range(0, len(y), chunk):
        xc, w = x[i : i + chunk], weights[i : i + chunk]
        at = y[i : i + chunk].view(-1, 1, 1).expand(-1, h, 1)
        z = torch.addmm(b_flat, xc, w_flat).view(len(xc), h, c)
        z -= z.amax(2, keepdim=True)
        p = z.exp()
        total = p.sum(2, keepdim=True)
        loss += ((total.log() - z.gather(2, at)).squeeze(2) * w).sum(0)
        p /= total  # softmax
        p.scatter_add_(2, at, torch.full(at.shape, -1.0))
        p = p.mul_(w[:, :, None]).view(len(xc), h * c)
        gw.addmm_(xc.t(), p)
        gb += p.sum(0)
    grad = torch.empty_like(theta)
    grad[:, :-1] = gw.view(d1 - 1, h, c).transpose(0, 1) + wd[:, None, None] * theta[:, :-1]
    grad[:, -1] = gb.view(h, c)
    return loss, grad


def _lbfgs(fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], theta: torch.Tensor,
           precond: torch.Tensor, max_iter: int, tol: float = 1e-5, history: int = 5) -> torch.Tensor:
    """Minimise H independent objectives at once (`fn` returns (H,) losses and their gradients): each
    head has its own L-BFGS memory and Armijo backtracking step; `precond` is the initial inverse Hessian."""
    heads = theta.shape[0]
    f, g = fn(theta)
    active = g.abs().amax((1, 2)) > tol
    mem: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1/s.y) per stored step
    for _ in range(max_iter):
        if not active.any():
            break
        q, alphas = g.clone(), []
        for s, yv, rho in reversed(mem):
            a = rho * _dot(s, q)
            q -= a[:, None, None] * yv
            alphas.append(a)
        r = q * precond
        if mem:
            s, yv, _ = mem[-1]
            sy, ypy = _dot(s, yv), _dot(yv, yv * precond)
            r *= torch.where((sy > 0) & (ypy > 0), sy / ypy.clamp_min(1e-30), torch.ones_like(sy))[:, None, None]
        for (s, yv, rho), a in zip(mem, reversed(alphas)):
            r += (a - rho * _dot(yv, r))[:, None, None] * s
        d = -r
        gd = _dot(g, d)
        uphill = gd >= 0
        if uphill.any():  # a stale memory: fall back to the preconditioned gradient for that head
            d[uphill] = -(g * precond)[uphill]
            gd = _dot(g, d)
        d[~active] = 0
        t, pending = torch.ones(heads), active.clone()
        f_new, g_new, t_new = f.clone(), g.clone(), torch.zeros(heads)
        for _ in range(30):
            ft, gt = fn(theta + (t * pending)[:, None, None] * d)
            ok = pending & (ft <= f + 1e-4 * t * gd)
            f_new[ok], g_new[ok], t_new[ok] = ft[ok], gt[ok], t[ok]
            pending &= ~ok
            if not pending.any():
                break
            t = torch.where(pending, 0.5 * t, t)
        step = t_new[:, None, None] * d
        theta = theta + step
        yv = g_new - g
        sy = _dot(step, yv)
        mem.append((step, yv, torch.where(sy > 0, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))))
        if len(mem) > history:
            mem.pop(0)
        stalled = (f - f_new) <= 1e-9 * f.abs().clamp_min(1e-3)  # below float32 resolution: done
        f, g = f_new, g_new
        active &= ~stalled & (g.abs().amax((1, 2)) > tol)
    return theta


@dataclass
class _Projection:
    """x -> ((x - mean) / std) @ axes: standardize with train statistics, then rotate onto the principal
    axes of the standardized train features (axes with numerically no variance dropped)."""

    matrix: torch.Tensor  # (D, r): axes / std
    offset: torch.Tensor  # (r,): -(mean / std) @ axes
    variances: torch.Tensor  # (r,): variance along each axis

    @classmethod
    def fit(cls, x: torch.Tensor, rel_eps: float = 1e-7, chunk: int = 8192) -> _Projection:
        mean, std = x.float().mean(0), x.float().std(0).clamp_min(1e-6)
        cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for i in range(0, len(x), chunk):
            xc = (x[i : i + chunk].float() - mean) / std
            cov += (xc.T @ xc).double()
        lam, axes = torch.linalg.eigh(cov / len(x))
        keep = lam > rel_eps * lam.max().clamp_min(1e-30)
        axes = axes[:, keep].float()
        return cls(axes / std[:, None], -(mean / std) @ axes, lam[keep].float())

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 8192) -> torch.Tensor:
        """The projection of x (or of x[rows]), computed in chunks without a standardized copy of x."""
        n = len(x) if rows is None else len(rows)
        out = torch.empty(n, self.matrix.shape[1])
        for i in range(0, n, chunk):
            xc = x[i : i + chunk] if rows is None else x[rows[i : i + chunk]]
            torch.addmm(self.offset, xc.float(), self.matrix, out=out[i : i + chunk])
        return out


def _preconditioner(variances: torch.Tensor, wd: float, num_classes: int) -> torch.Tensor:
    """Inverse of the Hessian of softmax regression at zero (curvature 1/C along each axis) plus the L2 term."""
    c = 1.0 / num_classes
    return torch.cat([1.0 / (c * variances + wd), torch.tensor([1.0 / c])])[None, :, None]


@dataclass
class _PathPoint:
    """One L2 strength on the path: held-out accuracy (%) and mean cross-entropy there."""

    wd: float
    top1: float
    loss: float
    score: float = 0.0  # top1 averaged with its neighbours on the path (1-2-1): what selection ranks


def _l2_path(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, held: Sequence[tuple[torch.Tensor, torch.Tensor]],
             variances: torch.Tensor, num_classes: int, wds: Sequence[float], max_iter: int, patience: int = 3,
             ) -> list[_PathPoint]:
    """Heads h fit on rows weighted by weights[:, h], scored on held[h] = (x, y) pooled, at each L2
    strength from strong to weak, each warm-started from the last; stops `patience` strengths past the best."""
    heads = weights.shape[1]
    theta = torch.zeros(heads, x.shape[1] + 1, num_classes)
    n_held = sum(len(yh) for _, yh in held)
    path: list[_PathPoint] = []
    for wd in wds:
        objective = partial(_softmax_objective, x, y, weights, torch.full((heads,), float(wd)))
        theta = _lbfgs(objective, theta, _preconditioner(variances, wd, num_classes), max_iter)
        correct, loss = 0, 0.0
        for k, (xh, yh) in enumerate(held):
            z = torch.addmm(theta[k, -1:], xh, theta[k, :-1])
            correct += int((z.argmax(1) == yh).sum())
            loss += float(F.cross_entropy(z, yh, reduction="sum"))
        path.append(_PathPoint(float(wd), 100.0 * correct / n_held, loss / n_held))
        if len(path) - 1 - max(range(len(path)), key=lambda i: (path[i].top1, -i)) >= patience:
            break
    # a small held-out set makes the accuracy curve jagged: rank a smoothed curve
    top1 = [path[0].top1, *(p.top1 for p in path), path[-1].top1]
    for i, p in enumerate(path):
        p.score = (top1[i] + 2 * top1[i + 1] + top1[i + 2]) / 4
    return path


def _row(features: str, point: _PathPoint, extra: Mapping[str, object]) -> dict[str, object]:
    return {"features": features, **extra, "weight_decay": point.wd, "heldout_top1": point.top1, "heldout_loss": point.loss}


@contextmanager
def _one_thread_if_small(work: int) -> Iterator[None]:
    """Run a small problem on one intra-op thread (restored after)."""
    threads = torch.get_num_threads()
    if work >= ONE_THREAD_BELOW or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _selection_rows(labels: torch.Tensor, heldout: float, folds: int, seed: int,
                    ) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
    """How train rows serve model selection: (row order, fit weights of the first len(weights) rows per head,
    held-out rows per head). Folds: every head sees all rows, weighted 0 outside its fit part. One split:
    rows reordered fit first, held out last, so both parts are views."""
    n = len(labels)
    if folds > 1:
        splits = stratified_folds(labels, folds, seed)
        weights = torch.zeros(n, folds)
        for k, (fit, _) in enumerate(splits):
            weights[fit, k] = 1.0 / max(1, len(fit))
        return None, weights, [h for _, h in splits]
    fit, held = heldout_split(labels, heldout, seed)
    return torch.cat([fit, held]), torch.full((len(fit), 1), 1.0 / max(1, len(fit))), [torch.arange(len(fit), n)]


def _lbfgs_fit(
    train: Mapping[str, torch.Tensor], train_labels: torch.Tensor, num_classes: int, weight_decays: Sequence[float],
    heldout: float, folds: int | None, seed: int, max_iter: int, row_extra: Mapping[str, object],
) -> tuple[dict[str, object], _Projection, nn.Linear, list[dict[str, object]]]:
    """L2 path per feature variant, selected on train only (highest smoothed held-out accuracy, then lowest
    held-out loss); the winner's path re-run on all of train: (its row, projection, head on the projection, grid)."""
    if not weight_decays:
        raise ZooError("the L-BFGS probe needs at least one weight decay in weight_decays")
    n = len(train_labels)
    if folds is None:
        folds = 1 if n * heldout >= CV_BELOW_HELDOUT else max(2, round(1 / heldout))
    order, weights, held_rows = _selection_rows(train_labels, heldout, folds, seed)
    if sum(len(h) for h in held_rows) == 0:
        raise ZooError("the train split is too small to hold out samples for model selection")
    y = train_labels if order is None else train_labels[order]
    grid: list[dict[str, object]] = []
    chosen: tuple[str, _PathPoint, _Projection] | None = None
    work = len(weights) * weights.shape[1] * num_classes * (max(t.shape[1] for t in train.values()) + 1)
    with _one_thread_if_small(work):
        for name in sorted(train):
            proj = _Projection.fit(train[name])
            x = proj(train[name], order)
            path = _l2_path(x[: len(weights)], y[: len(weights)], weights, [(x[h], y[h]) for h in held_rows],
                            proj.variances, num_classes, weight_decays, max_iter)
            grid += [_row(name, p, row_extra) for p in path]
            for p in path:
                if chosen is None or (p.score, -p.loss) > (chosen[1].score, -chosen[1].loss):
                    chosen = (name, p, proj)
            del x
        assert chosen is not None
        name, point, proj = chosen
        # refit: the chosen variant's path re-run on all of train up to the chosen strength (the same
        # iteration budget the held-out score judged), then touch val once
        x = proj(train[name])
        scale = float((weights > 0).sum(0).float().mean()) / n  # same prior, more data: L2 per row shrinks as 1/N
        theta = torch.zeros(1, x.shape[1] + 1, num_classes)
        for wd in weight_decays[: list(weight_decays).index(point.wd) + 1]:
            objective = partial(_softmax_objective, x, train_labels, torch.full((n, 1), 1.0 / n), torch.tensor([wd * scale]))
            theta = _lbfgs(objective, theta, _preconditioner(proj.variances, wd * scale, num_classes), max_iter)
        head = nn.Linear(x.shape[1], num_classes)
        with torch.no_grad():
            head.weight.copy_(theta[0, :-1].t())
            head.bias.copy_(theta[0, -1])
    return _row(name, point, row_extra), proj, head, grid


def _lbfgs_select(
    train: Mapping[str, torch.Tensor], train_labels: torch.Tensor, val: Mapping[str, torch.Tensor],
    val_labels: torch.Tensor, num_classes: int, weight_decays: Sequence[float], heldout: float,
    folds: int | None, seed: int, max_iter: int, row_extra: Mapping[str, object],
) -> tuple[dict[str, object], float, list[dict[str, object]]]:
    """`_lbfgs_fit` on train, then the chosen head's val top-1."""
    row, proj, head, grid = _lbfgs_fit(train, train_labels, num_classes, weight_decays, heldout, folds, seed,
                                       max_iter, row_extra)
    work = len(val_labels) * num_classes * (head.in_features + 1)
    with _one_thread_if_small(work):
        top1 = _accuracy(head, proj(val[str(row["features"])]), val_labels)
    return row, top1, grid


# ---------------------------------------------------------------- SGD grid


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


def _sgd_select(
    train: Mapping[str, torch.Tensor], train_labels: torch.Tensor, val: Mapping[str, torch.Tensor],
    val_labels: torch.Tensor, num_classes: int, lrs: Sequence[float], epochs: int, batch_size: int,
    heldout: float, seed: int,
) -> tuple[dict[str, object], float, list[dict[str, object]]]:
    """The SGD grid (variants x lrs) selected on one held-out split of train; refit of the winner; val top-1."""
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
    xtr, xva = _standardize(train[best["features"]].float(), val[best["features"]].float())
    head = _train_grid([xtr], train_labels, [best["lr"]], num_classes, epochs, batch_size, seed)[0][0]
    return dict(best), _accuracy(head, xva, val_labels), grid


# ---------------------------------------------------------------- public API


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
    solver: str = "lbfgs",
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    folds: int | None = None,
    max_iter: int = 20,
) -> ProbeResult:
    """Val top-1 (%) of the best linear head over feature variants (`{"cls": ..., "cls+avg": ...}` or
    one tensor), chosen on train alone; L-BFGS over `weight_decays` by default, or the SGD grid over `lrs`.

    L-BFGS: `folds`-fold cross-validation (default: 1/heldout folds when a single held-out part would
    be small, else one split), `max_iter` iterations per L2 strength. SGD: `lrs`, `epochs`, `batch_size`."""
    if solver not in SOLVERS:
        raise ZooError(f"unknown linear-probe solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if isinstance(train, torch.Tensor):
        train, val = {"features": train}, {"features": val}
    if set(train) != set(val):
        raise ZooError(f"train and val have different feature variants: {sorted(train)} vs {sorted(val)}")
    train_labels, val_labels = train_labels.long(), val_labels.long()
    num_classes = _check_labels(train_labels, val_labels)
    if solver == "sgd":
        best, top1, grid = _sgd_select(train, train_labels, val, val_labels, num_classes, lrs, epochs, batch_size,
                                       heldout, seed)
    else:
        # "lr" is L-BFGS's initial step length; it stays in each row for readers of the SGD grid's rows
        best, top1, grid = _lbfgs_select(train, train_labels, val, val_labels, num_classes, weight_decays, heldout,
                                         folds, seed, max_iter, {"solver": "lbfgs", "lr": 1.0})
    return ProbeResult(best=best, top1=top1, grid=grid)


def fit_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    heldout: float = 0.2,
    folds: int | None = None,
    seed: int = 0,
    max_iter: int = 20,
) -> nn.Linear:
    """`linear_probe`'s L-BFGS head fitted on (N, D) features (L2 strength chosen on them alone), as one
    `nn.Linear` from raw features to logits (its standardization folded in), for classifying new data."""
    labels = labels.long()
    if len(labels) == 0 or len(features) != len(labels):
        raise ZooError(f"fit_linear_head needs one label per feature row, got {len(features)} rows and {len(labels)} labels")
    num_classes = int(labels.max()) + 1
    _, proj, head, _ = _lbfgs_fit({"features": features}, labels, num_classes, weight_decays, heldout, folds, seed,
                                  max_iter, {})
    fused = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        fused.weight.copy_((proj.matrix @ head.weight.t()).t())
        fused.bias.copy_(proj.offset @ head.weight.t() + head.bias)
    return fused


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
    """Multinomial logistic regression (loss: mean CE + l2 * |W|^2) by L-BFGS on one feature tensor, l2
    picked on a held-out part of train; `linear_probe`'s solver with these L2 strengths and one split."""
    train_labels, val_labels = train_labels.long(), val_labels.long()
    num_classes = _check_labels(train_labels, val_labels)
    wds = sorted((2.0 * l2 for l2 in l2_grid), reverse=True)
    best, top1, grid = _lbfgs_select({"features": train}, train_labels, {"features": val}, val_labels, num_classes,
                                     wds, heldout, 1, seed, max_iter, {})
    rows = [{"l2": r["weight_decay"] / 2.0, "heldout_top1": r["heldout_top1"], "heldout_loss": r["heldout_loss"]}
            for r in (best, *grid)]
    return ProbeResult(best=rows[0], top1=top1, grid=rows[1:])
