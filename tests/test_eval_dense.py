"""Dense linear probe: the metric on hand-checked cases, the probe learns linearly encoded masks,
lr selection never looks at val, and the whole path runs on a random ViT over `scenes` shards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.data import write_shards
from zoo.data.builtin import generate
from zoo.errors import ZooError
from zoo.eval import dense
from zoo.eval.dense import DenseResult, confusion_matrix, dense_probe, extract_dense, miou


# -- miou --------------------------------------------------------------------------------------
def test_miou_perfect_prediction_is_100():
    t = torch.tensor([[0, 1, 2], [2, 1, 0]])
    m, per_class = miou(t, t, num_classes=3)
    assert m == 100.0 and per_class.tolist() == [100.0, 100.0, 100.0]


def test_miou_hand_computed_2x2_three_classes():
    target = torch.tensor([[0, 0], [1, 2]])
    pred = torch.tensor([[0, 1], [1, 1]])
    # class 0: tp 1, union 2 -> 50; class 1: tp 1, union 3 -> 33.3; class 2: tp 0, union 1 -> 0
    m, per_class = miou(pred, target, num_classes=3)
    assert per_class.tolist() == pytest.approx([50.0, 100 / 3, 0.0])
    assert m == pytest.approx((50 + 100 / 3 + 0) / 3)
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_miou_ignores_ignore_index_pixels():
    target = torch.tensor([[0, 255], [1, 255]])
    pred = torch.tensor([[0, 1], [1, 0]])  # both ignored pixels are "wrong" but do not count
    m, _ = miou(pred, target, num_classes=2)
    assert m == 100.0
    m, _ = miou(pred, target.masked_fill(target == 255, 7), num_classes=8, ignore_index=7)
    assert m == 100.0


def test_miou_excludes_classes_absent_from_both():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    m, per_class = miou(pred, target, num_classes=4)  # classes 2 and 3 appear nowhere
    assert math.isnan(per_class[2]) and math.isnan(per_class[3])
    assert m == pytest.approx((50.0 + 200 / 3) / 2)
    # a class only predicted (never in GT) counts, with IoU 0
    m, per_class = miou(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=3)
    assert per_class[2] == 0.0 and m == pytest.approx((50.0 + 0.0) / 2)


def test_miou_rejects_bad_values():
    with pytest.raises(ZooError, match="outside 0..2"):
        miou(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=3)
    with pytest.raises(ZooError, match="shape"):
        miou(torch.tensor([0, 1]), torch.tensor([[0, 1]]), num_classes=3)


# -- the probe on toy features --------------------------------------------------------------
def toy(n, seed, classes=4, grid=8, patch=4, noise=0.3, extra=12, ignore_frac=0.05):
    """Regions of 2x2 patches with random classes; features = one-hot of the patch-level (downsampled)
    mask + noise channels, so a per-patch linear head can read the mask off the features."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, classes, (n, grid // 2, grid // 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    onehot = F.one_hot(cells, classes).permute(0, 3, 1, 2).float()
    feats = torch.cat([onehot * 2, torch.zeros(n, extra, grid, grid)], 1)
    feats = feats + noise * torch.randn(feats.shape, generator=g)
    masks = cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    masks[torch.rand(masks.shape, generator=g) < ignore_frac] = 255
    return feats, masks


def test_probe_learns_linearly_encoded_masks():
    xtr, ytr = toy(40, seed=0)
    xva, yva = toy(12, seed=1)
    res = dense_probe(xtr, ytr, xva, yva, epochs=10)
    assert isinstance(res, DenseResult) and res.task == "segmentation"
    assert res.miou > 90 and res.metrics["mIoU"] == res.miou and res.pixel_acc > 90
    assert set(res.per_class_iou) == {0, 1, 2, 3} and res.num_classes == 4
    assert [r["lr"] for r in res.grid] == [1e-3, 1e-2, 1e-1]
    assert res.best["lr"] in (1e-3, 1e-2, 1e-1)
    assert res.split == {"fit_images": 32, "heldout_images": 8, "train_images": 40, "val_images": 12}
    d = res.as_dict()
    assert d["mIoU"] == res.miou and "head" not in d
    # the returned head is a plain module: frozen BatchNorm2d(affine=False) then a 1x1 conv
    bn, conv = res.head
    assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and conv.kernel_size == (1, 1)


def test_probe_without_norm_and_with_explicit_num_classes():
    xtr, ytr = toy(24, seed=2, classes=3)
    xva, yva = toy(8, seed=3, classes=3)
    res = dense_probe(xtr, ytr, xva, yva, num_classes=5, norm="none", epochs=8, lrs=(1e-1,))
    assert res.num_classes == 5 and res.miou > 90
    assert set(res.per_class_iou) <= {0, 1, 2}  # classes 3 and 4 are never seen or predicted


def test_selection_never_touches_val(monkeypatch):
    """Scrambled val masks must not change the held-out grid or the chosen lr; val is scored once, last."""
    xtr, ytr = toy(30, seed=4, noise=1.0)
    xva, yva = toy(8, seed=5, noise=1.0)
    kw = dict(epochs=3, lrs=(1e-3, 1e-2, 1e-1))
    a = dense_probe(xtr, ytr, xva, yva, **kw)
    scrambled = yva.flatten()[torch.randperm(yva.numel())].reshape(yva.shape)
    b = dense_probe(xtr, ytr, xva, scrambled, **kw)
    assert a.best == b.best and a.grid == b.grid
    seen = []
    real = dense._confusions
    monkeypatch.setattr(dense, "_confusions", lambda heads, f, m, idx, *r: seen.append(f is xva) or real(heads, f, m, idx, *r))
    dense_probe(xtr, ytr, xva, yva, **kw)
    assert seen == [False, True]


# -- errors ------------------------------------------------------------------------------------
def test_errors():
    x, y = toy(10, seed=6)
    with pytest.raises(ZooError, match="10 feature maps but 9 masks"):
        dense_probe(x, y[:9], x, y)
    with pytest.raises(ZooError, match="val split is empty"):
        dense_probe(x, y, x[:0], y[:0])
    with pytest.raises(ZooError, match="train split is empty"):
        dense_probe(x[:0], y[:0], x, y)
    with pytest.raises(ZooError, match="value 3, outside 0..2"):
        dense_probe(x, y, x, y, num_classes=3)
    with pytest.raises(ZooError, match="value -1"):
        dense_probe(x, y, x, torch.full_like(y, -1))
    with pytest.raises(ZooError, match="too few"):
        dense_probe(x[:1], y[:1], x, y)
    with pytest.raises(ZooError, match="task 'depth'"):
        dense_probe(x, y, x, y, task="depth")
    with pytest.raises(ZooError, match="channels"):
        dense_probe(x, y, x[:, :3], y)


def test_extract_dense_rejects_models_without_patch_maps(tmp_path):
    with pytest.raises(ZooError, match="no ViT patch maps"):
        extract_dense(nn.Linear(2, 2), str(tmp_path / "x.tar"))
    with pytest.raises(ZooError, match="no ViT patch maps"):
        dense.patch_maps(zoo.create_model("resnet18"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ZooError, match="blocks=9"):
        dense.patch_maps(zoo.create_model("vit_nano_patch4_32"), torch.zeros(1, 3, 32, 32), blocks=9)


# -- end to end ----------------------------------------------------------------------------
def test_end_to_end_random_vit_on_scenes(tmp_path):
    train = write_shards(generate("scenes", 48, size=32), tmp_path / "train", maxcount=16)
    val = write_shards(generate("scenes", 16, size=32, seed=1), tmp_path / "val")
    model = zoo.create_model("vit_nano_patch4_32")
    model.train()
    xtr, ytr = extract_dense(model, [str(p) for p in train], blocks=2, batch_size=20)
    assert model.training  # mode restored
    assert xtr.shape == (48, 2 * 128, 8, 8) and xtr.dtype == torch.float32
    assert ytr.shape == (48, 32, 32) and ytr.dtype == torch.long and int(ytr.max()) <= 6
    xva, yva = extract_dense(model, [str(p) for p in val], blocks=2, max_samples=10, batch_size=4)
    assert xva.shape == (10, 2 * 128, 8, 8) and yva.shape == (10, 32, 32)
    last, yva_last = extract_dense(model, [str(p) for p in val], max_samples=10)  # default: the last block
    assert torch.equal(yva_last, yva) and torch.allclose(last, xva[:, 128:], atol=1e-5)  # blocks concatenate in order
    res = dense_probe(xtr, ytr, xva, yva, num_classes=7, epochs=3)
    assert 0.0 <= res.miou <= 100.0 and 0.0 <= res.pixel_acc <= 100.0
    assert res.per_class_iou and all(0.0 <= v <= 100.0 for v in res.per_class_iou.values())
    assert 0 in res.per_class_iou  # background is everywhere
