"""zoo.eval.linear_probe, old default (SGD grid) vs new default (L-BFGS L2 path), vs a converged reference.

The reference is scikit-learn's multinomial LogisticRegression (lbfgs, max_iter 1000) on standardized
features, C chosen by 5-fold cross-validation over 1e-4..1e4 (LogisticRegressionCV). Feature sets:
built-in digits as raw pixels and as features of a random-init ViT-T (as `zoo demo` probes them),
scenes through the same ViT, and Gaussian mixtures with label noise (medium and large). Rows marked
"x3" are the mean over three draws of the train subset. Last, one call at the demo's size (digits,
cls and cls+avg variants, as `zoo.eval.protocols.evaluate` calls it), median of three.

    python benchmarks/linear_probe.py                  # about 7 minutes on 2 cores (the references take most)
    python benchmarks/linear_probe.py --skip-large     # without the 50k x 384 set (its reference takes minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

ARCH = "vit_tiny_patch4_32"
Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_val, y_val


def digits_pixels(size: int) -> Split:
    """The built-in digits (1438 train / 359 val) as grey pixels at size x size."""
    from zoo.data.builtin import generate

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        samples = list(generate("digits", 2000, split=split, size=size))
        x = np.stack([np.asarray(s["image"], dtype=np.float32)[..., 0].ravel() for s in samples])
        return torch.from_numpy(x), torch.tensor([int(s["label"]) for s in samples])

    return (*load("train"), *load("val"))


def vit_features(dataset: str, n_train: int, n_val: int) -> dict[str, Split]:
    """{"cls": ..., "cls+avg": ...} of a random-init ViT-T over a built-in dataset, as `zoo demo` computes them."""
    from zoo.eval.features import pool

    import zoo
    from zoo.data.builtin import generate
    from zoo.data.transforms import eval_transform

    torch.manual_seed(0)
    model = zoo.create_model(ARCH, pos_embed="sincos").eval()
    transform = eval_transform(model.pretrained_cfg)
    out: dict[str, list[torch.Tensor]] = {"cls": [], "cls+avg": []}
    for split, n in (("train", n_train), ("val", n_val)):
        samples = list(generate(dataset, n, split=split))
        x = torch.stack([transform(s["image"]) for s in samples])
        feats = [pool(model, x[i : i + 256], ("cls", "cls+avg")) for i in range(0, len(x), 256)]
        for v in out:
            out[v] += [torch.cat([f[v] for f in feats]), torch.tensor([int(s["label"]) for s in samples])]
    return {v: tuple(t) for v, t in out.items()}  # type: ignore[misc]


def mixture(n_train: int, n_val: int, dim: int, classes: int, spread: float, label_noise: float, seed: int = 0) -> Split:
    """Gaussian classes with correlated axes; `label_noise` of the labels (train and val) replaced at random."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(classes, dim, generator=g)
    mixing = torch.randn(dim, dim, generator=g) * torch.logspace(0, -0.5, dim)[:, None] / dim**0.5
    n = n_train + n_val
    y = torch.randint(classes, (n,), generator=g)
    x = (means[y] + torch.randn(n, dim, generator=g)) @ mixing
    y = torch.where(torch.rand(n, generator=g) < label_noise, torch.randint(classes, (n,), generator=g), y)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def per_class(data: Split, k: int, seed: int) -> Split:
    """The first k train samples of each class after a seeded shuffle; val unchanged."""
    x, y, xv, yv = data
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:k]]
                     for c in torch.unique(y)]).sort().values
    return x[idx], y[idx], xv, yv


def reference(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> float:
    """Val top-1 (%) of multinomial logistic regression, C by 5-fold CV, on standardized features."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stops at max_iter on the weakest C of nearly separable sets
        model = LogisticRegressionCV(Cs=np.logspace(-4, 4, 9), cv=5, max_iter=1000)
        model.fit(scaler.transform(x.numpy()), y.numpy())
    return 100.0 * float((model.predict(scaler.transform(xv.numpy())) == yv.numpy()).mean())


def old_default(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> float:
    """The probe's default before: the SGD grid (8 learning rates, 30 epochs), kept as solver="sgd"."""
    from zoo.eval.linear import linear_probe

    return linear_probe(x, y, xv, yv, solver="sgd").top1


def new_default(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> float:
    from zoo.eval.linear import linear_probe

    return linear_probe(x, y, xv, yv).top1


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]] = {
    "ref": reference, "old": old_default, "new": new_default}


def timed(fn: Callable[..., float], data: Split) -> tuple[float, float]:
    t = time.perf_counter()
    acc = fn(*data)
    return acc, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-large", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from zoo.eval.linear import linear_probe

    print("building feature sets ...", flush=True)
    px8, px32 = digits_pixels(8), digits_pixels(32)
    digits_vit, scenes_vit = vit_features("digits", 1438, 359), vit_features("scenes", 1000, 500)
    sets: list[tuple[str, list[Split]]] = [
        ("digits pixels 8x8, 20/class x3", [per_class(px8, 20, s) for s in range(3)]),
        ("digits pixels 8x8", [px8]),
        ("digits pixels 32x32", [px32]),
        ("digits ViT-T random, cls, 20/class x3", [per_class(digits_vit["cls"], 20, s) for s in range(3)]),
        ("digits ViT-T random, cls", [digits_vit["cls"]]),
        ("digits ViT-T random, cls+avg", [digits_vit["cls+avg"]]),
        ("scenes ViT-T random, cls", [scenes_vit["cls"]]),
        ("mixture (medium), 20% label noise", [mixture(10_000, 2_000, 256, 50, 0.25, 0.2)]),
    ]
    if not args.skip_large:
        sets.append(("mixture (large), 20% label noise", [mixture(50_000, 10_000, 384, 20, 0.25, 0.2)]))

    cols = ("feature set", "N train", "D", "classes", "reference", "ref s", "old", "old s", "new", "new s", "new-ref")
    print(f"\nval top-1 (%) and seconds per call, {args.threads} threads\n")
    print(f"{cols[0]:38s} {cols[1]:>7s} {cols[2]:>5s} {cols[3]:>7s} " + " ".join(f"{c:>9s}" for c in cols[4:]))
    for name, draws in sets:
        res = {m: [timed(fn, d) for d in draws] for m, fn in METHODS.items()}
        acc = {m: statistics.mean(a for a, _ in r) for m, r in res.items()}
        sec = {m: statistics.mean(t for _, t in r) for m, r in res.items()}
        x, y = draws[0][0], draws[0][1]
        print(f"{name:38s} {len(y):7d} {x.shape[1]:5d} {int(y.max()) + 1:7d} "
              f"{acc['ref']:9.2f} {sec['ref']:9.2f} {acc['old']:9.2f} {sec['old']:9.2f} {acc['new']:9.2f} {sec['new']:9.2f} "
              f"{acc['new'] - acc['ref']:+9.2f}", flush=True)

    # one call as `zoo demo` makes it: digits, both variants
    xtr = {v: digits_vit[v][0] for v in digits_vit}
    xva = {v: digits_vit[v][2] for v in digits_vit}
    ytr, yva = digits_vit["cls"][1], digits_vit["cls"][3]
    calls = {"old": {"solver": "sgd"}, "new": {}}
    times: dict[str, list[float]] = {k: [] for k in calls}
    top1: dict[str, float] = {}
    for rep in range(4):  # interleaved, so a drifting load hits both alike; the first round warms up
        for k, kw in calls.items():
            t = time.perf_counter()
            top1[k] = linear_probe(xtr, ytr, xva, yva, epochs=30, **kw).top1
            if rep:
                times[k].append(time.perf_counter() - t)
    print(f"\ndemo-size call (digits, {len(ytr)} train, variants cls 192-d + cls+avg 384-d), median of 3: "
          + ", ".join(f"{k} {statistics.median(times[k]):.2f} s (top-1 {top1[k]:.2f})" for k in calls))


if __name__ == "__main__":
    main()
