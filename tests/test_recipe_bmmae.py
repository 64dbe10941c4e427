"""BM-MAE recipe: modality dropout never drops all, MultiMAE's Dirichlet masking keeps exactly the visible total,
a dropped modality is fully masked and still scored, any subset of modalities at evaluation, the exported
single-modality ViTs, modality shards for zoo's evals, and the bad-input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.errors import ConfigError, SampleError
from zoo.recipes.bmmae import (
    BMMAE,
    ModalityTransform,
    dirichlet_masking,
    min_modalities,
    modality_dropout_mask,
    modality_losses,
    modality_shards,
)

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
MODS = ("image", "thermal", "depth")


def tiny(**kw) -> BMMAE:
    torch.manual_seed(0)
    return BMMAE("vit_nano_patch4_32", **{**TINY, **kw})


def inputs(B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "thermal": torch.randn(B, 1, 32, 32, generator=g),
            "depth": torch.randn(B, 1, 32, 32, generator=g)}


# -- modality dropout --------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("min_keep", [1, 2])
def test_modality_dropout_never_drops_all(p, min_keep):
    dropped = modality_dropout_mask(20000, 3, p, min_keep=min_keep, generator=torch.Generator().manual_seed(1))
    kept = (~dropped).sum(1)
    assert kept.min() >= min_keep and kept.max() <= 3
    if p == 0.9:  # symmetric: no modality is the one always kept
        per_modality = (~dropped).float().mean(0)
        assert (per_modality - per_modality.mean()).abs().max() < 0.02


def test_modality_dropout_rate_and_seed():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    d = modality_dropout_mask(30000, 3, 0.3, generator=g())
    # P(dropped) = 0.3 minus the rows that dropped all three (0.027), which get one of the three back
    assert abs(d.float().mean().item() - (0.3 - 0.027 / 3)) < 0.01
    assert torch.equal(d, modality_dropout_mask(30000, 3, 0.3, generator=g()))
    assert not modality_dropout_mask(100, 3, 0.0).any()
    with pytest.raises(ValueError, match="modality dropout"):
        modality_dropout_mask(4, 3, 1.0)


def test_min_modalities():
    assert min_modalities([64, 64, 64], 48) == 1
    assert min_modalities([64, 64, 64], 65) == 2
    assert min_modalities([64, 64, 64], 192) == 3
    assert min_modalities([10, 40], 30) == 2  # the smaller one alone cannot hold it


# -- Dirichlet masking across modalities ----------------------------------------------------------
def check_masking(B, counts, ratio, dropped=None, seed=0):
    N, K = sum(counts), int(sum(counts) * (1 - ratio))
    ids_keep, ids_restore, mask, visible = dirichlet_masking(
        B, counts, ratio, dropped=dropped, generator=torch.Generator().manual_seed(seed))
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, N) and mask.shape == (B, N)
    assert ((1 - mask).sum(1) == K).all()  # exactly the visible total in every sample
    assert (visible.sum(1) == K).all()
    start = 0
    for m, n in enumerate(counts):  # no modality beyond its tokens; the mask agrees with the split
        assert (visible[:, m] <= n).all()
        assert torch.equal((1 - mask[:, start : start + n]).sum(1).long(), visible[:, m])
        start += n
    for b in range(B):  # ids_keep are the visible tokens
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    ids_shuffle = torch.argsort(ids_restore, dim=1)  # ids_restore inverts the shuffle, kept tokens first
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    values = torch.randn(B, N, 2)
    shuffled = torch.gather(values, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 2))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 2)), values)
    return mask, visible


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25, 0.9])
def test_dirichlet_masking_invariants(ratio):
    mask, visible = check_masking(64, [64, 64, 64], ratio)  # ratio 0.25: K = 144 > 64, redraws keep each <= 64
    if ratio == 0.75:  # Dirichlet(1): shares vary from sample to sample, mean 1/3 each
        assert visible.float().std(0).min() > 5
        assert ((visible.float().mean(0) - 16).abs() < 4).all()


def test_dirichlet_masking_unequal_modalities_and_seed():
    check_masking(16, [16, 64, 4], 0.6)
    a = dirichlet_masking(8, [16, 16], 0.75, generator=torch.Generator().manual_seed(5))
    b = dirichlet_masking(8, [16, 16], 0.75, generator=torch.Generator().manual_seed(5))
    c = dirichlet_masking(8, [16, 16], 0.75, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[2], c[2])


def test_dropped_modality_is_fully_masked_and_budget_goes_to_the_others():
    B, L = 300, 16
    dropped = modality_dropout_mask(B, 3, 0.9, generator=torch.Generator().manual_seed(0))
    mask, visible = check_masking(B, [L] * 3, 0.75, dropped=dropped)
    blocks = mask.view(B, 3, L)
    assert (blocks[dropped] == 1).all()  # every token of a dropped modality removed
    assert (visible[dropped] == 0).all()
    # the budget exactly fills the free tokens (K = 32 = two modalities of 16): redraws cannot find the only
    # valid split, the fallback gives it
    two = torch.tensor([[False, False, True]]).expand(4, 3)
    _, visible = check_masking(4, [L] * 3, 1 - 32 / 48, dropped=two)
    assert torch.equal(visible, torch.tensor([[16, 16, 0]]).expand(4, 3))


# -- loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix", [False, True])
def test_modality_losses_match_per_modality_mean(norm_pix):
    g = torch.Generator().manual_seed(0)
    pred = {"a": torch.randn(3, 4, 12, generator=g), "b": torch.randn(3, 4, 5, generator=g)}
    target = {"a": torch.randn(3, 4, 12, generator=g), "b": torch.randn(3, 4, 5, generator=g)}
    mask = (torch.rand(3, 8, generator=g) > 0.5).float()
    mask[:, 4:] = 1  # "b" dropped in every sample: all removed, still scored
    got = modality_losses(pred, target, mask, norm_pix)
    for i, m in enumerate("ab"):
        t = target[m]
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        per = ((pred[m] - t) ** 2).mean(-1)
        mm = mask[:, 4 * i : 4 * i + 4]
        assert torch.allclose(got[m], (per * mm).sum() / mm.sum())
    none = modality_losses(pred, target, torch.zeros(3, 8), norm_pix)
    assert all(v.item() == 0 for v in none.values())  # no removed patch: 0, not NaN


def test_dropped_modality_still_gets_a_loss_term_and_gradient():
    model = tiny(modality_dropout=0.3).train()
    x = inputs(4)
    tokens, grid = model.tokenize(x)
    dropped = torch.tensor([[False, True, False]]).expand(4, 3)  # thermal missing in every sample
    ids_keep, ids_restore, mask = model.sample_mask(4, tokens.shape[1], 0.75, tokens.device, dropped=dropped)
    assert (mask[:, 64:128] == 1).all() and (mask[:, :64] == 0).any()
    pred = model.decode(model.encode(tokens, ids_keep), ids_restore, grid)
    terms = modality_losses(pred, model.targets(x), mask, False)
    assert set(terms) == set(MODS) and all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert model.decoder.decoder_pred["thermal"].weight.grad.abs().sum() > 0  # reconstructed
    assert model.patch_embeds["thermal"].proj.weight.grad is None or \
        model.patch_embeds["thermal"].proj.weight.grad.abs().sum() == 0  # never seen by the encoder
    assert model.patch_embeds["depth"].proj.weight.grad.abs().sum() > 0


def test_training_step_with_high_dropout_logs_every_modality():
    model = tiny(modality_dropout=0.9).train()
    torch.manual_seed(0)
    out = model.training_step(inputs(16), 0)
    assert {f"loss_{m}" for m in MODS} <= set(out) and torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], sum(out[f"loss_{m}"] for m in MODS))
    assert 0.3 < out["modality_unseen"] < 2 / 3 + 1e-6  # many dropped, never all three of a sample
    out["loss"].backward()
    model.eval()  # no dropout outside training: each sample sees its K tokens spread by the Dirichlet shares
    g = torch.Generator().manual_seed(0)
    _, _, mask = model.sample_mask(16, 192, 0.75, torch.device("cpu"), g)
    assert ((1 - mask).sum(1) == 48).all()


# -- any subset at evaluation, exports -----------------------------------------------------------
def test_features_accept_any_subset_and_exports_match():
    model = tiny().eval()
    x = inputs(3)
    with torch.no_grad():
        for r in (1, 2, 3):
            for subset in itertools.combinations(MODS, r):
                f = model.features({m: x[m] for m in reversed(subset)})  # the dict's order does not matter
                assert f.shape == (3, 32) and torch.isfinite(f).all()
                assert torch.equal(f, model.features({m: x[m] for m in subset}))
        assert not torch.allclose(model.features({"image": x["image"]}), model.features(x))
        exports = model.export("vit_nano_patch4_32.bmmae_t")
        assert list(exports) == ["vit_nano_patch4_32.bmmae_t", "vit_nano_patch4_32.bmmae_t_thermal",
                                 "vit_nano_patch4_32.bmmae_t_depth"]
        for (name, item), m in zip(exports.items(), MODS):
            vit = item.model
            assert type(vit).__name__ == "VisionTransformer" and vit.zoo_arch == "vit_nano_patch4_32"
            assert vit.patch_embed.proj.in_channels == model.channels[m] and item.card["bmmae"]["modality"] == m
            assert torch.allclose(vit(x[m]), model.features({m: x[m]}), atol=1e-6)
            assert torch.equal(vit.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
        assert exports["vit_nano_patch4_32.bmmae_t"].model is model.encoder  # no duplicate RGB patch embedding
        thermal = exports["vit_nano_patch4_32.bmmae_t_thermal"].model
        assert thermal.pretrained_cfg["input_size"] == (1, 32, 32) and thermal.pretrained_cfg["mean"] == (0.5,)
        # zoo's eval transform turns a grey (PIL "L") image into the 1-channel model's input
        t = zoo.data.transforms.eval_transform(thermal)(Image.new("L", (32, 32), 128))
        assert t.shape == (1, 32, 32)


def test_modality_transform_crops_every_modality_together():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    sample = {"image": Image.fromarray(np.stack([grey] * 3, -1)), "thermal": Image.fromarray(grey),
              "depth": Image.fromarray(255 - grey)}
    specs = {"image": (3, (0.5,) * 3, (0.5,) * 3), "thermal": (1, (0.2,), (0.1,)), "depth": (1, (0.5,), (0.5,))}
    torch.manual_seed(0)
    out = ModalityTransform(specs, 32)(sample)
    assert out["image"].shape == (3, 32, 32) and out["thermal"].shape == (1, 32, 32)
    image01, thermal01 = out["image"][:1] * 0.5 + 0.5, out["thermal"] * 0.1 + 0.2
    assert torch.allclose(image01, thermal01, atol=1e-5)  # the same crop and flip
    assert not torch.allclose(thermal01, torch.from_numpy(grey).float()[None] / 255, atol=1e-2)  # a real crop
    with pytest.raises(SampleError, match="has no 'depth' field; its fields: image, thermal"):
        ModalityTransform(specs, 32)({"image": sample["image"], "thermal": sample["thermal"]})


def test_modality_shards_put_the_rendering_in_the_image_field(tmp_path):
    from zoo.data import loader
    from zoo.data.builtin import generate, materialize

    pattern = materialize("scenes", "val", 8, root=tmp_path)
    thermal = modality_shards(pattern, "thermal")
    assert ".thermal-as-image" in thermal and modality_shards(pattern, "thermal") == thermal  # once, reused
    got = {}
    for batch in loader(thermal, fields=("image", "label"), transform=lambda s: {
            "image": np.array(s["image"].convert("L")), "label": s["label"]}, batch_size=8, shuffle=0):
        got = batch
    want = list(generate("scenes", 8, seed=0, size=32, split="val"))
    assert torch.equal(got["image"], torch.from_numpy(np.stack([np.array(s["thermal"]) for s in want])))
    assert got["label"].tolist() == [s["label"] for s in want]
    assert modality_shards(pattern, "image") == pattern


# -- bad input ---------------------------------------------------------------------------------------
def test_modality_no_sample_has(tmp_path):
    from zoo.data.builtin import materialize

    pattern = materialize("scenes", "val", 8, root=tmp_path)
    model = tiny(modalities=["image", "lidar"])
    with pytest.raises(ConfigError, match=r"'lidar' is in no sample.*fields caption, depth, image, label, mask, "
                                          r"meta, thermal; set method.modalities to some of \['depth', 'image', "
                                          r"'thermal'\]") as e:
        model.data_spec().prepare(pattern, True)
    assert "\n" not in str(e.value)
    assert tiny().data_spec().prepare(pattern, True) == pattern


@pytest.mark.parametrize("kw, match", [
    (dict(modality_dropout=1.0), r"modality_dropout must be in \[0, 1\)"),
    (dict(modality_dropout=1.5), r"modality_dropout must be in \[0, 1\)"),
    (dict(modalities=[]), "modalities is empty"),
    (dict(modalities=["image", "image"]), "twice"),
    (dict(modalities=["image"], modality_dropout=0.3), "at least 2 modalities"),
    (dict(mask_ratio=0.25, modality_dropout=0.3), "need all 3 modalities, so none can be dropped"),
    (dict(channels={"lidar": 1}), "'lidar', which is not in modalities"),
    (dict(norm={"thermal": {"mean": [0.1, 0.2], "std": 0.1}}), "norm mean of 'thermal' must be 1 number"),
    (dict(in_chans=1), "method.channels"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        tiny(**kw)
    assert "\n" not in str(e.value)


def test_features_errors():
    model = tiny()
    x = inputs(2)
    with pytest.raises(SampleError, match="at least one modality"):
        model.features({})
    with pytest.raises(SampleError, match="unknown modality 'lidar'; this model has image, thermal, depth"):
        model.features({"image": x["image"], "lidar": x["depth"]})
    with pytest.raises(SampleError, match=r"'thermal' must be \(B, 1, H, W\)"):
        model.features({"thermal": x["image"]})
    with pytest.raises(SampleError, match="differ in batch or image size"):
        model.features({"image": x["image"], "thermal": x["thermal"][:1]})
    with pytest.raises(SampleError, match=r"every modality, \['depth'\] missing"):
        model.forward_masked({"image": x["image"], "thermal": x["thermal"]})
