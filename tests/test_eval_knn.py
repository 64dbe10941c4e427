"""kNN: chunked computation equals the formula computed directly; edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.eval.knn import knn_eval, knn_scores


def direct_scores(train, labels, test, k, T, C):
    """The DINO formula, unchunked: sum over the k most similar of exp(cos/T) one-hot votes."""
    s = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, idx = s.topk(k, dim=1)
    onehot = F.one_hot(labels[idx], C).float()
    return (onehot * (top / T).exp()[..., None]).sum(1)


@pytest.mark.parametrize("n_test", [1, 37, 250])
def test_chunked_equals_direct(n_test):
    g = torch.Generator().manual_seed(0)
    C = 7
    train = torch.randn(500, 16, generator=g)
    labels = torch.randint(0, C, (500,), generator=g)
    test = torch.randn(n_test, 16, generator=g)
    got = knn_scores(train, labels, test, ks=(1, 10, 20, 100), num_classes=C, query_chunk=16, train_chunk=64)
    for k, scores in got.items():
        ref = direct_scores(train, labels, test, k, 0.07, C)
        assert torch.allclose(scores, ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(scores.argmax(1), ref.argmax(1))


def test_accuracy_on_separable_clusters_and_top5_rule():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 32, generator=g) * 5
    ytr = torch.arange(6).repeat(30)
    yte = torch.arange(6).repeat(5)
    xtr = centers[ytr] + torch.randn(180, 32, generator=g)
    xte = centers[yte] + torch.randn(30, 32, generator=g)
    res = knn_eval(xtr, ytr, xte, yte, ks=(10, 20))
    assert res["top1_k10"] == 100.0 and res["top5_k20"] == 100.0
    res3 = knn_eval(xtr[ytr < 3], ytr[ytr < 3], xte[yte < 3], yte[yte < 3], ks=(10,))
    assert "top5_k10" not in res3  # fewer than 5 classes: no top-5


def test_k_larger_than_train_bank():
    res = knn_eval(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0]), torch.randn(3, 4), torch.tensor([0, 1, 0]), ks=(200,))
    assert 0.0 <= res["top1_k200"] <= 100.0


def test_bad_inputs():
    with pytest.raises(ZooError, match="never occur in train"):
        knn_eval(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ZooError, match="empty"):
        knn_eval(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.randn(0, 3), torch.tensor([], dtype=torch.long))
    with pytest.raises(ZooError, match="one width"):
        knn_eval(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.randn(2, 5), torch.tensor([0, 1]))
