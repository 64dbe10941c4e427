"""Dense evaluation: the metric on hand-checked cases, the linear probe learns linearly encoded masks,
lr selection never looks at val, the whole path runs on a random ViT over `scenes` shards; UNIP's
LL-FPN head (scales, raw last-block input, learns frozen), fine-tuning with layer decay, the
thermal image field, the errors, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.data import write_shards
from zoo.data.builtin import generate
from zoo.errors import ZooError
from zoo.eval import dense
from zoo.eval.dense import (LLFPN, DenseResult, LLFPNHead, SegmentationModel, confusion_matrix, dense_finetune,
                            dense_probe, extract_dense, miou)


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


# -- LL-FPN head, fine-tuning, image fields (UNIP) ------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """16 train and 8 val built-in scenes at 32 px: (train shard paths, val shard paths, root)."""
    root = tmp_path_factory.mktemp("scenes")
    train = [str(p) for p in write_shards(generate("scenes", 16, size=32), root / "train", maxcount=8)]
    val = [str(p) for p in write_shards(generate("scenes", 8, size=32, seed=1), root / "val")]
    return train, val, root


def test_llfpn_levels_are_4x_2x_1x_half_of_the_grid():
    pyramid = LLFPN(8)
    up4 = [type(m) for m in pyramid.fpn1]
    assert up4 == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]
    x = torch.randn(2, 8, 6, 4)
    levels = pyramid(x)
    assert [tuple(t.shape) for t in levels] == [(2, 8, 24, 16), (2, 8, 12, 8), (2, 8, 6, 4), (2, 8, 3, 2)]
    assert torch.equal(levels[2], x) and torch.equal(levels[3], F.max_pool2d(x, 2))
    assert LLFPNHead(8, 5, width=4)(x).shape == (2, 5, 24, 16)  # logits at the 4x level
    with pytest.raises(ZooError, match="at least 2x2, got 1x3"):
        pyramid(torch.randn(1, 8, 1, 3))


def test_llfpn_reads_unnormalised_last_block_tokens(scenes):
    train, _, _ = scenes
    model = zoo.create_model("vit_nano_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    raw = model.forward_intermediates(x, indices=[3], norm=False, intermediates_only=True)[0]
    normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
    assert not torch.allclose(raw, normed, atol=1e-3)
    # fine-tuning: what the pyramid receives is the raw last-block map
    seg = SegmentationModel(model, LLFPNHead(128, 3, width=8), norm=False).eval()
    seen = []
    seg.head.pyramid.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    assert seg(x).shape == (2, 3, 32, 32)
    torch.testing.assert_close(seen[0], raw)
    # frozen: extract_dense(norm=False) gives the same maps for the loader's images
    feats, _ = extract_dense(model, train, norm=False, max_samples=2)
    images = next(iter(dense.dense_loader(model, train, batch_size=2)))["image"]
    ref = model.forward_intermediates(images, indices=[-1], norm=False, intermediates_only=True)[0]
    torch.testing.assert_close(feats, ref)


def test_frozen_llfpn_learns_a_separable_toy_task():
    xtr, ytr = toy(24, seed=0)
    xva, yva = toy(8, seed=1)
    res = dense_probe(xtr, ytr, xva, yva, head="llfpn", epochs=5, width=16, lrs=(1e-2,))
    trivial, _ = miou(torch.zeros_like(yva), yva, num_classes=4)  # all "background"
    assert trivial < 15 and res.miou > 70 and res.miou > trivial + 50
    assert isinstance(res.head, LLFPNHead) and not res.head.training
    assert res.best["head"] == "llfpn" and [r["lr"] for r in res.grid] == [1e-2]


def test_finetune_trains_a_copy_with_layer_decay(scenes, monkeypatch):
    train, val, _ = scenes
    model = zoo.create_model("vit_nano_patch4_32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = dense.layer_decay_groups
    monkeypatch.setattr(dense, "layer_decay_groups", lambda *a: calls.append(a[1:]) or real(*a))
    res = dense_finetune(model, train, val, epochs=1, lr=1e-3, batch_size=8, drop_path=0.1)
    assert calls == [(1e-3, 0.05, 0.85)]  # the official AdamW weight decay and layer decay
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    seg = res.head
    assert isinstance(seg, SegmentationModel) and isinstance(seg.head, LLFPNHead) and not seg.norm
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight"):
        assert not torch.equal(seg.backbone.state_dict()[name], before[name]), name
    assert type(seg.backbone.blocks[0].drop_path1) is nn.Identity  # stochastic depth rises to 0.1 at the last block
    assert seg.backbone.blocks[3].drop_path1.drop_prob == pytest.approx(0.1)
    assert res.best["steps"] == 2 and res.split == {"train_images": 16, "val_images": 8}
    assert 2 <= res.num_classes <= 7 and 0.0 <= res.miou <= 100.0 and 0 in res.per_class_iou
    # layer decay: head 1, last block 0.85, ..., stem 0.85 ** (depth + 1); no weight decay on 1-D / pos / cls
    lr_of, wd_of = {}, {}
    for group in dense.layer_decay_groups(seg, 1.0, 0.05, 0.85):
        for p in group["params"]:
            lr_of[id(p)], wd_of[id(p)] = group["lr"], group["weight_decay"]
    named = dict(seg.named_parameters())
    lr = {n: lr_of[id(named[n])] for n in named}
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.85 ** 5)
    assert lr["backbone.cls_token"] == pytest.approx(0.85 ** 5)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.85 ** 4)
    assert lr["backbone.blocks.3.attn.qkv.weight"] == pytest.approx(0.85)
    assert lr["head.pyramid.fpn1.0.weight"] == lr["head.classifier.weight"] == 1.0
    assert lr["backbone.patch_embed.proj.weight"] < lr["backbone.blocks.3.attn.qkv.weight"]
    assert wd_of[id(named["backbone.cls_token"])] == 0.0 and wd_of[id(named["backbone.blocks.0.attn.qkv.bias"])] == 0.0
    assert wd_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == 0.05


def _thermal_from_mask_shards(root):
    """Samples whose thermal field is the mask times 60 (grey) and whose RGB image is colour noise."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        mask = np.zeros((32, 32), np.uint8)
        for cls in (1, 2, 3):
            y, x = rng.integers(0, 20, 2)
            mask[y : y + rng.integers(6, 12), x : x + rng.integers(6, 12)] = cls
        noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        samples.append({"image": Image.fromarray(noise), "mask": mask, "thermal": Image.fromarray(mask * 60, "L")})
    return [str(p) for p in write_shards(samples, root, image_format="png")]


def test_thermal_field_is_three_equal_channels_aligned_with_the_mask(tmp_path, scenes):
    urls = _thermal_from_mask_shards(tmp_path / "t")
    model = zoo.create_model("vit_nano_patch4_32")
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    for train in (False, True):  # eval resize + crop, and random resized crops + flips
        batch = next(iter(dense.dense_loader(model, urls, train=train, image_field="thermal", batch_size=8, seed=3)))
        x = batch["image"] * std + mean  # back to [0, 1]
        assert x.shape == (8, 3, 32, 32)
        torch.testing.assert_close(x[:, 1], x[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(x[:, 2], x[:, 0], atol=1e-5, rtol=0)
        read = (x[:, 0] * 255 / 60).round().long()
        agree = (read == batch["mask"]).float().mean()
        assert agree > 0.9, (train, agree)
        assert (read == batch["mask"].flip(-1)).float().mean() < agree - 0.1
    # built-in scenes: thermal features differ from the RGB image's
    train_urls = scenes[0]
    rgb, m1 = extract_dense(model, train_urls, max_samples=4)
    thermal, m2 = extract_dense(model, train_urls, max_samples=4, image_field="thermal")
    assert torch.equal(m1, m2) and rgb.shape == thermal.shape and not torch.allclose(rgb, thermal)


def test_dense_errors_say_what_fits(scenes):
    train, val, _ = scenes
    x, y = toy(10, seed=6)
    with pytest.raises(ZooError, match="unknown dense head 'upernet'; use one of linear, llfpn"):
        dense_probe(x, y, x, y, head="upernet")
    with pytest.raises(ZooError, match="linear head only"):
        dense_probe(x, y, x, y, head="llfpn", norm="bn")
    small = x[:, :, :1, :1]
    with pytest.raises(ZooError, match="at least 2x2, got 1x1"):
        dense_probe(small, y, small, y, head="llfpn")
    model = zoo.create_model("vit_nano_patch4_32")
    with pytest.raises(ZooError, match="unknown dense head 'fpn'"):
        dense_finetune(model, train, val, head="fpn")
    with pytest.raises(ZooError, match="at least 2x2, got 1x1"):
        dense_finetune(zoo.create_model("vit_nano_patch4_32", img_size=4), train, val)
    with pytest.raises(ZooError, match="layer_decay"):
        dense_finetune(model, train, val, layer_decay=1.5)

    class PatchMapsOnly(nn.Module):  # a dense model without blocks or a group_matcher
        def __init__(self):
            super().__init__()
            self.vit = zoo.create_model("vit_nano_patch4_32")
            self.patch_embed = self.vit.patch_embed

        def forward_intermediates(self, *args, **kwargs):
            return self.vit.forward_intermediates(*args, **kwargs)

    with pytest.raises(ZooError, match="no transformer blocks with a group_matcher"):
        dense_finetune(PatchMapsOnly(), train, val)
    fields = "they have 7 fields: caption, depth, image, label, mask, meta, thermal"
    with pytest.raises(ZooError, match=rf"image field 'infrared' \(8 skipped\); {fields}"):
        extract_dense(model, val, image_field="infrared")
    with pytest.raises(ZooError, match=rf"image field 'infrared' \(16 skipped\); {fields}"):
        dense_finetune(model, train, val, image_field="infrared", epochs=1)


def test_cli_llfpn_and_finetune_end_to_end(scenes, tmp_path, capsys):
    from zoo.cli import main

    _, _, root = scenes
    base = ["eval", "dense", "vit_nano_patch4_32", "--train", str(root / "train/*.tar"), "--val", str(root / "val/*.tar"),
            "--epochs", "1", "--batch-size", "8"]
    assert main(base + ["--head", "llfpn", "--lr", "1e-2", "--out", str(tmp_path / "f.json")]) == 0
    out = json.loads((tmp_path / "f.json").read_text())
    assert out["head"] == "llfpn" and out["finetune"] is False and out["results"]["best"]["head"] == "llfpn"
    assert 0.0 <= out["results"]["mIoU"] <= 100.0
    assert "VAL mIoU (llfpn, lr=0.01)" in capsys.readouterr().out
    assert main(base + ["--finetune", "--image-field", "thermal", "--lr", "1e-3", "--out", str(tmp_path / "t.json")]) == 0
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["finetune"] is True and out["image_field"] == "thermal" and out["results"]["best"]["layer_decay"] == 0.85
    assert "VAL mIoU (finetune lr=0.001, layer decay 0.85)" in capsys.readouterr().out
    capsys.readouterr()
    assert main(base + ["--head", "upernet"]) == 2
    assert main(base + ["--layer-decay", "0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zoo: error: unknown dense head 'upernet'; use one of linear, llfpn",
                   "zoo: error: --layer-decay applies to --finetune only: add --finetune or drop --layer-decay"]
