"""Every registered model, automatically: forward, backward, intermediates, publish -> load round trip.
Image-text models (registry meta `modality: image-text`, e.g. a whole CLIP) get their own checks."""

from __future__ import annotations

import functools

import pytest
import torch

import zoo
from zoo.errors import ZooError
from zoo.factory import count_params as _count_params
from zoo.models.vit import VisionTransformer
from zoo.registry import MODELS

BIG = 100_000_000  # models above this are tested at a reduced input size and marked slow
DEEP = 20_000_000  # ViTs above this are built a few blocks deep (see _shallow)
count_params = functools.cache(_count_params)  # an architecture's size, built once on the meta device


def _cases(modality: str = "image") -> list:
    """Registered models of a modality; FLAME's whole models read text through a frozen LM loaded by name and
    are tested with one in tests/test_flame.py."""
    names = [n for n in zoo.list_models() if MODELS.get(n).meta.get("modality", "image") == modality
             and MODELS.get(n).meta.get("family") != "flame"]
    return [pytest.param(n, marks=pytest.mark.slow) if count_params(n) > BIG else n for n in names]


def _input(model, name: str, batch: int = 2) -> torch.Tensor:
    """The model's own input size, except for big models, non-ViTs above 64 px, and ViTs of over 256 patches
    (patch 8 at 224 px, DINOv2's 518 px): those get 4x4 patches (a ViT takes any size)."""
    c, h, w = model.pretrained_cfg["input_size"]
    vit = isinstance(model, VisionTransformer)
    if count_params(name) > BIG or h > 64 and not vit or vit and (h // model.patch_embed.patch_size[0]) ** 2 > 256:
        patch = model.patch_embed.patch_size[0] if isinstance(model, VisionTransformer) else 32
        h = w = patch * 4
    return torch.randn(batch, c, h, w)


def _shallow(name: str, depth: int = 2) -> dict:
    """ViTs of over DEEP parameters (ViT-S and up) are built with a few of their blocks: width, heads, patch and
    every code path are theirs, depth only repeats a block; forward/backward, the feature API, the round trip and
    the preprocessing are the same, the 350 MB of a ViT-B or 2.5 GB of a ViT-H computed, written and read back
    are not."""
    vit = MODELS.get(name).meta.get("family") == "vit"
    return {"depth": depth} if count_params(name) > BIG or vit and count_params(name) > DEEP else {}


@pytest.mark.parametrize("name", _cases())
def test_forward_backward(name):
    model = zoo.create_model(name, num_classes=7, **_shallow(name, depth=4))
    x = _input(model, name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", _cases())
def test_features_and_intermediates(name):
    model = zoo.create_model(name, **_shallow(name, depth=4)).eval()  # the feature API does not depend on depth
    x = _input(model, name)
    with torch.no_grad():
        pooled = model(x)
        assert pooled.shape == (2, model.num_features), "num_classes=0 must give pooled features"
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats, pre_logits=True), pooled, atol=1e-5)
        final, inter = model.forward_intermediates(x, indices=2)
        assert len(inter) == 2
        assert torch.allclose(final, feats, atol=1e-5), "forward_intermediates' final output differs from forward_features"
        for t in inter:
            assert t.ndim == 4 and t.shape[0] == 2  # NCHW maps
        only = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert len(only) == 1 and only[0].ndim == 4


@pytest.mark.parametrize("name", _cases())
def test_publish_load_roundtrip(name):
    model = zoo.create_model(name, **_shallow(name))
    x = _input(model, name, batch=1)
    path = zoo.publish(model, f"{name}.test", {"recipe": "none", "steps": 0})
    loaded = zoo.load(f"{name}.test")
    assert not loaded.training, "zoo.load returns models in eval mode"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.zoo_card["arch"] == name
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()


@pytest.mark.parametrize("name", _cases())
def test_pretrained_cfg(name):
    model = zoo.create_model(name, **_shallow(name))
    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 3
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    assert cfg["interpolation"] in ("bilinear", "bicubic")


@pytest.mark.parametrize("name", _cases("image-text"))
def test_image_text_model(name):
    """encode_image / encode_text / tokenizer / pretrained_cfg, gradients everywhere, publish -> load."""
    model = zoo.create_model(name)
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(2, c, h, w)
    tokens = model.tokenizer(["a red circle", "two blue squares"])
    img, txt = model.encode_image(x), model.encode_text(tokens)
    assert img.shape == txt.shape and img.shape[0] == 2
    (img @ txt.T * model.logit_scale.exp()).logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    zoo.publish(model, f"{name}.test", {"recipe": "none", "steps": 0})
    loaded = zoo.load(f"{name}.test")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    assert loaded.zoo_card["arch"] == name


def test_vit_token_masking_keeps_only_chosen_patches():
    model = zoo.create_model("vit_nano_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    with torch.no_grad():
        out = model.forward_features(x, keep=keep)
        assert out.shape == (2, 1 + 16, 128)
        # keeping every patch in order is the unmasked forward
        full = model.forward_features(x, keep=torch.arange(64).expand(2, -1))
        assert torch.allclose(full, model.forward_features(x), atol=1e-6)


def test_vit_other_resolution_resamples_position_embedding():
    model = zoo.create_model("vit_nano_patch4_32").eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 1 + 144, 128)


def test_sincos_pos_embed_is_fixed_and_mae_ordered():
    model = zoo.create_model("vit_nano_patch4_32", pos_embed="sincos")
    pos = model.pos_embed
    assert not pos.requires_grad
    assert torch.all(pos[0, 0] == 0), "class-token slot is zero"
    # first half encodes the column: tokens in one column share it; second half encodes the row
    grid = pos[0, 1:].reshape(8, 8, 128)
    assert torch.allclose(grid[0, 3, :64], grid[5, 3, :64])
    assert torch.allclose(grid[2, 0, 64:], grid[2, 7, 64:])
    assert not torch.allclose(grid[0, 0, :64], grid[0, 1, :64])


def test_create_model_accepts_tag_and_overrides():
    model = zoo.create_model("vit_nano_patch4_32.some_tag", num_classes=3, global_pool="avg")
    assert model.zoo_arch == "vit_nano_patch4_32"
    assert model.zoo_args == {"num_classes": 3, "global_pool": "avg"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(zoo.ZooError, match="vit_nano_patch4_32"):
        zoo.create_model("vit_nano_patch_32")


def test_vit_normalisation_follows_its_channel_count():
    grey = zoo.create_model("vit_nano_patch4_32", in_chans=1)
    assert grey.pretrained_cfg["input_size"][0] == 1
    assert grey.pretrained_cfg["mean"] == pytest.approx((0.449,)) and grey.pretrained_cfg["std"] == pytest.approx((0.226,))
    five = zoo.create_model("vit_nano_patch4_32", in_chans=5, mean=(0.1,) * 5, std=(0.2,) * 5)
    assert five.pretrained_cfg["mean"] == (0.1,) * 5
    with pytest.raises(ZooError, match="one value per input channel"):
        zoo.create_model("vit_nano_patch4_32", in_chans=1, mean=(0.1, 0.2, 0.3), std=(0.2, 0.2, 0.2))
