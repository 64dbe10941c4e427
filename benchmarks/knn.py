"""zoo.eval.knn vs a straightforward re-implementation of DINO's chunked kNN loop.

Random 384-d features (100k train x 10k test, 1000 classes by default). DINO's loop runs once per
k, with 100 test chunks and a one-hot vote tensor; ours runs every k in one pass over chunks of
queries and of the train bank. Each method runs in its own process so its peak memory (max RSS
above the process's baseline with the features loaded) is its own.

    python benchmarks/knn.py --train 100000 --test 10000 --dim 384 --classes 1000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

from measure import peak_bytes, reset_peak

KS = (10, 20, 100, 200)
CPU = torch.device("cpu")


def data(n_train: int, n_test: int, dim: int, classes: int):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = F.normalize(centers[ytr] + 2.0 * torch.randn(n_train, dim, generator=g), dim=1)
    xte = F.normalize(centers[yte] + 2.0 * torch.randn(n_test, dim, generator=g), dim=1)
    return xtr, ytr, xte, yte


def dino_loop(xtr, ytr, xte, k, T, classes, num_chunks=100):
    """DINO eval_knn's algorithm: one pass per k, N/100 test rows per chunk, one-hot votes."""
    train_t = xtr.t()
    n = xte.shape[0]
    step = max(n // num_chunks, 1)
    one_hot = torch.zeros(k, classes)
    preds = []
    for i in range(0, n, step):
        q = xte[i : i + step]
        b = q.shape[0]
        sim = q @ train_t
        dist, idx = sim.topk(k, largest=True, sorted=True)
        neigh = ytr.view(1, -1).expand(b, -1).gather(1, idx)
        one_hot.resize_(b * k, classes).zero_()
        one_hot.scatter_(1, neigh.reshape(-1, 1), 1)
        w = dist.clone().div_(T).exp_()
        probs = (one_hot.view(b, -1, classes) * w.view(b, -1, 1)).sum(1)
        preds.append(probs.argmax(1))
    return torch.cat(preds)


def run(method: str, args, queue) -> None:
    torch.set_num_threads(args.threads)
    from zoo.eval.knn import knn_predict  # imported before the baseline: library code is not the method's memory

    xtr, ytr, xte, _ = data(args.train, args.test, args.dim, args.classes)
    base = reset_peak(CPU)
    t = time.perf_counter()
    if method == "dino":
        preds = {k: dino_loop(xtr, ytr, xte, k, 0.07, args.classes) for k in KS}
    else:
        preds = {k: p[:, 0] for k, p in knn_predict(xtr, ytr, xte, ks=KS, num_classes=args.classes, top=1).items()}
    sec = time.perf_counter() - t
    peak = (peak_bytes(CPU) - base) / 2**20
    queue.put((method, sec, peak, {k: v.tolist() for k, v in preds.items()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=100_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for method in ("dino", "zoo"):
        q = ctx.Queue()
        proc = ctx.Process(target=run, args=(method, args, q))
        proc.start()
        results[method] = q.get()
        proc.join()
    _, t_dino, m_dino, p_dino = results["dino"]
    _, t_zoo, m_zoo, p_zoo = results["zoo"]
    same = all(p_dino[k] == p_zoo[k] for k in KS)
    agree = min(sum(a == b for a, b in zip(p_dino[k], p_zoo[k])) / len(p_dino[k]) for k in KS)
    print(f"\nkNN, k in {KS}, T=0.07: {args.train} train x {args.test} test, {args.dim}-d, {args.classes} classes, "
          f"{args.threads} threads\n")
    print(f"{'method':34s} {'seconds':>8s} {'peak MiB':>9s}")
    print(f"{'DINO chunked loop (one pass per k)':34s} {t_dino:8.1f} {m_dino:9.0f}")
    print(f"{'zoo.eval.knn (all k, one pass)':34s} {t_zoo:8.1f} {m_zoo:9.0f}")
    print(f"\nspeed-up {t_dino / t_zoo:.2f}x; identical predictions: {same} (min agreement over k {100 * agree:.3f}%)")


if __name__ == "__main__":
    main()
