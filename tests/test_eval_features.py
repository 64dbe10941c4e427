"""Feature extraction: pooling variants, order, and a cache that is reused only when it should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.errors import ZooError
from zoo.eval import features as F
from zoo.data import write_shards


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture
def shards(tmp_path):
    g = np.random.default_rng(0)
    samples = ({"__key__": f"{i:09d}", "image": Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                "label": i % 3} for i in range(20))
    write_shards(samples, tmp_path / "s", maxcount=8, image_format="png")
    return str(tmp_path / "s" / "*.tar")


def test_spaced_blocks_follow_poa():
    assert F.spaced_blocks(12, 4) == [3, 6, 9, 11]
    assert F.spaced_blocks(6, 1) == [5]
    assert F.spaced_blocks(3, 4) == [1, 2]  # shallower than 4 (a small POA size): POA's rule repeats blocks once


def test_spaced_pooling_on_a_model_shallower_than_n_and_last_n_refused(shards):
    model = zoo.create_model("vit_nano_patch4_32", depth=3)
    feats, _ = F.extract_features(model, shards, variants=("spaced4",), transform=to_tensor, batch_size=8)
    assert feats["spaced4"].shape == (20, 2 * 128)
    with pytest.raises(ZooError, match="1..3 blocks"):
        F.extract_features(model, shards, variants=("last4",), transform=to_tensor)


def test_evaluate_reports_each_k_and_probes_the_chosen_variants(shards, monkeypatch):
    from zoo.eval import protocols

    seen, real = {}, protocols.linear_probe

    def probe(train, train_labels, val, val_labels, **kw):
        seen["variants"] = sorted(train)
        return real(train, train_labels, val, val_labels, **kw)

    monkeypatch.setattr(protocols, "linear_probe", probe)
    model = zoo.create_model("vit_nano_patch4_32")
    out = protocols.evaluate(model, shards, shards, k=(5, 3), linear_variants=("cls", "spaced2"))
    assert set(out) == {"knn_top1", "knn_top1_k3", "linear_top1"} and seen["variants"] == ["cls", "spaced2"]
    single = protocols.evaluate(model, shards, shards, k=5, protocols=("knn",))
    assert single == {"knn_top1": out["knn_top1"]}  # the first k is the headline number
    with pytest.raises(ZooError, match="k >= 1"):
        protocols.evaluate(model, shards, shards, k=(), protocols=("knn",))


def test_variants_shapes_and_values(shards):
    model = zoo.create_model("vit_nano_patch4_32")
    feats, labels = F.extract_features(model, shards, variants=("cls", "avg", "cls+avg", "last2", "spaced2"),
                                       transform=to_tensor, batch_size=6)
    assert labels.tolist() == [i % 3 for i in range(20)]
    assert feats["cls"].shape == (20, 128) and feats["cls+avg"].shape == (20, 256)
    assert feats["last2"].shape == (20, 256) and feats["spaced2"].shape == (20, 256)
    assert torch.allclose(feats["cls+avg"][:, :128], feats["cls"])
    # the last block's normalised class token is the final class token
    assert torch.allclose(feats["last2"][:, 128:], feats["cls"], atol=1e-5)


def test_cache_is_reused_only_for_the_same_model_and_transform(shards, tmp_path, monkeypatch):
    model = zoo.create_model("vit_nano_patch4_32")
    calls = []
    real = F.pool
    monkeypatch.setattr(F, "pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, _ = F.extract_features(model, shards, transform=to_tensor, cache_dir=tmp_path / "cache")
    n = len(calls)
    b, _ = F.extract_features(model, shards, transform=to_tensor, cache_dir=tmp_path / "cache")
    assert len(calls) == n and torch.equal(a["cls"], b["cls"])  # cache hit: no forward
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.1)  # other weights: recomputed
    c, _ = F.extract_features(model, shards, transform=to_tensor, cache_dir=tmp_path / "cache")
    assert len(calls) > n and not torch.allclose(c["cls"], a["cls"])


def test_models_without_class_token():
    model = zoo.create_model("resnet18")
    out = F.pool(model.eval(), torch.randn(2, 3, 32, 32), ["cls"])
    assert out["cls"].shape == (2, 512)
    with pytest.raises(ZooError, match="only pooling 'cls'"):
        F.pool(model, torch.randn(2, 3, 32, 32), ["last4"])
    with pytest.raises(ZooError, match="unknown pooling"):
        F.pool(model, torch.randn(2, 3, 32, 32), ["gem"])
