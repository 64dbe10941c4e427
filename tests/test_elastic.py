"""Elastic ViT (POA): sliced sub-networks, α folding, gradients, extraction, official-checkpoint conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

import zoo
from zoo.convert import poa_model, poa_to_vit
from zoo.errors import CheckpointMismatchError, ConfigError
from zoo.models.elastic import (
    block_ids,
    check_size,
    elastic_forward_features,
    elastic_forward_features_list,
    extract,
    sliced_state_dict,
)
from zoo.models.vit import VisionTransformer, timm_kwargs

D_MAX, L_MAX, HEAD = 64, 6, 16
SIZES = [(64, 6), (32, 3), (48, 4), (16, 1), (64, 2), (16, 6)]


def tiny_vit(**kwargs) -> VisionTransformer:
    """A tiny intact ViT with every parameter randomised, so no slice is trivially zero or one."""
    args = dict(img_size=16, patch_size=4, embed_dim=D_MAX, depth=L_MAX, num_heads=D_MAX // HEAD, init_values=1e-5)
    vit = VisionTransformer(**{**args, **kwargs})
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("gamma"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return vit


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


# -- block ids, sizes -------------------------------------------------------------------------------
def test_block_ids_match_poa_linspace():
    assert block_ids(24, 12) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]
    for max_depth, depth in [(24, 12), (24, 13), (24, 24), (24, 1), (12, 7), (31, 23), (61, 27), (6, 4)]:
        assert block_ids(max_depth, depth) == np.linspace(0, max_depth - 1, depth).astype(np.int64).tolist()
    assert block_ids(24, 24) == list(range(24))


@pytest.mark.parametrize(
    "width, depth, message",
    [
        (40, 3, r"width 40 is not a positive multiple of the head size 16; valid widths: 16, 32, 48, 64"),
        (0, 3, r"valid widths: 16, 32, 48, 64"),
        (80, 3, r"width 80 exceeds the intact model's 64; valid widths: 16, 32, 48, 64"),
        (32, 0, r"depth 0 is outside 1\.\.6"),
        (32, 7, r"depth 7 is outside 1\.\.6"),
    ],
)
def test_bad_sizes_name_the_valid_range(width, depth, message):
    vit = tiny_vit()
    with pytest.raises(ConfigError, match=message):
        check_size(vit, width, depth)
    with pytest.raises(ConfigError, match=message):
        elastic_forward_features(vit, images(), width, depth)
    with pytest.raises(ConfigError, match=message):
        extract(vit, width, depth)


def test_valid_widths_of_a_large_model_are_abbreviated():
    with pytest.raises(ConfigError, match=r"the head size 64; valid widths: 64, 128, \.\.\., 1024$"):
        check_size(VisionTransformer(embed_dim=1024, depth=1, num_heads=16, img_size=32), 100, 1)


# -- sliced forward == extracted plain ViT == intact ------------------------------------------------
def test_full_size_is_the_intact_model_exactly():
    vit = tiny_vit(drop_path_rate=0.3)
    x = images()
    vit.eval()
    assert torch.equal(elastic_forward_features(vit, x, D_MAX, L_MAX), vit.forward_features(x))
    vit.train()  # same blocks, same drop-path rates, same random stream: the same stochastic depth
    torch.manual_seed(1)
    elastic = elastic_forward_features(vit, x, D_MAX, L_MAX)
    torch.manual_seed(1)
    assert torch.equal(elastic, vit.forward_features(x))


def test_sliced_state_dict_has_the_plain_sub_network_keys_and_shapes():
    vit = tiny_vit(global_pool="avg", num_classes=5, qkv_bias=False)
    sd = sliced_state_dict(vit, 32, 3)
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, init_values=1e-5,
                              global_pool="avg", num_classes=5, qkv_bias=False)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg", "num_classes": 3, "qkv_bias": False, "init_values": None}])
@pytest.mark.parametrize("train", [False, True])
def test_sliced_forward_equals_extracted_plain_vit(kwargs, train):
    vit = tiny_vit(**kwargs).train(train)  # drop_path 0, dropout 0: train mode is deterministic
    x = images()
    for width, depth in SIZES:
        sub = extract(vit, width, depth).train(train)
        assert isinstance(sub, VisionTransformer) and sub.embed_dim == width and len(sub.blocks) == depth
        assert sub.elastic == {"width": width, "depth": depth, "block_ids": block_ids(L_MAX, depth),
                               "parent_width": D_MAX, "parent_depth": L_MAX}
        elastic = elastic_forward_features(vit, x, width, depth)
        assert elastic.shape == (2, 17, width)
        torch.testing.assert_close(elastic, sub.forward_features(x), rtol=0, atol=1e-6)
        if vit.num_classes:  # the classifier reads the width-D features: input columns [:D], weight × α
            pooled = F.layer_norm(elastic[:, 1:].mean(1), (width,), vit.fc_norm.weight[:width],
                                  vit.fc_norm.bias[:width], eps=1e-6)
            logits = F.linear(pooled * (D_MAX / width), vit.head.weight[:, :width], vit.head.bias)
            torch.testing.assert_close(sub(x), logits, rtol=0, atol=1e-6)


def test_sub_networks_differ_from_each_other():
    vit = tiny_vit().eval()
    x = images()
    a = elastic_forward_features(vit, x, 32, 3)
    b = elastic_forward_features(vit, x, 32, 4)
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a[..., :16], elastic_forward_features(vit, x, 16, 3), atol=1e-3)


def test_drop_path_follows_the_intact_model_mode():
    vit = tiny_vit(drop_path_rate=0.5)
    x = images(8)
    vit.train()
    assert not torch.equal(elastic_forward_features(vit, x, 32, 4), elastic_forward_features(vit, x, 32, 4))
    vit.eval()
    assert torch.equal(elastic_forward_features(vit, x, 32, 4), elastic_forward_features(vit, x, 32, 4))


def test_masked_and_multi_crop_forwards():
    vit = tiny_vit().eval()
    mask_token = torch.randn(1, 1, D_MAX)
    globals_, locals_ = images(2, 16), images(3, 8)
    mask = torch.rand(2, 16) < 0.4
    sub = extract(vit, 32, 3).eval()
    for token in (mask_token, mask_token.reshape(-1)):
        torch.testing.assert_close(
            elastic_forward_features(vit, globals_, 32, 3, mask=mask, mask_token=token),
            sub.forward_features(globals_, mask=mask, mask_token=mask_token[..., :32]), rtol=0, atol=1e-6)
    expected = sub.forward_features_list([globals_, locals_], masks=[mask, None], mask_token=mask_token[..., :32])
    for pack in (False, True):
        got = elastic_forward_features_list(vit, [globals_, locals_], 32, 3, masks=[mask, None], mask_token=mask_token,
                                            pack=pack)
        assert [g.shape for g in got] == [(2, 17, 32), (3, 5, 32)]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


# -- α folding is exact: an independent POA-style forward ---------------------------------------------
def poa_reference(vit: VisionTransformer, x: torch.Tensor, width: int, depth: int) -> torch.Tensor:
    """POA's formulation written out: intact weights sliced (not folded), every elastic Linear's input scaled by
    max_in / active_in, LayerNorms over the active width."""
    d_max, hidden, hidden_max = vit.embed_dim, 4 * width, 4 * vit.embed_dim
    heads = width // HEAD
    pe = vit.patch_embed.proj
    t = F.conv2d(x, pe.weight[:width], pe.bias[:width], stride=pe.stride).flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls_token[..., :width].expand(len(x), -1, -1), t], dim=1) + vit.pos_embed[..., :width]
    b, n, _ = t.shape
    rows = torch.cat([torch.arange(width) + i * d_max for i in range(3)])
    for i in np.linspace(0, len(vit.blocks) - 1, depth).astype(int):
        blk = vit.blocks[i]
        h = F.layer_norm(t, (width,), blk.norm1.weight[:width], blk.norm1.bias[:width], eps=1e-6)
        qkv_bias = blk.attn.qkv.bias[rows] if blk.attn.qkv.bias is not None else None
        qkv = F.linear(h * (d_max / width), blk.attn.qkv.weight[rows][:, :width], qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, HEAD).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / HEAD**0.5, dim=-1) @ v
        o = F.linear(attn.transpose(1, 2).reshape(b, n, width) * (d_max / width),
                     blk.attn.proj.weight[:width, :width], blk.attn.proj.bias[:width])
        t = t + blk.ls1.gamma[:width] * o
        h = F.layer_norm(t, (width,), blk.norm2.weight[:width], blk.norm2.bias[:width], eps=1e-6)
        h = F.gelu(F.linear(h * (d_max / width), blk.mlp.fc1.weight[:hidden, :width], blk.mlp.fc1.bias[:hidden]))
        h = F.linear(h * (hidden_max / hidden), blk.mlp.fc2.weight[:width, :hidden], blk.mlp.fc2.bias[:width])
        t = t + blk.ls2.gamma[:width] * h
    return F.layer_norm(t, (width,), vit.norm.weight[:width], vit.norm.bias[:width], eps=1e-6)


@pytest.mark.parametrize("width, depth", [(16, 2), (32, 3), (48, 5), (64, 4)])
def test_alpha_folding_is_exact(width, depth):
    vit = tiny_vit().double().eval()
    x = images().double()
    torch.testing.assert_close(elastic_forward_features(vit, x, width, depth), poa_reference(vit, x, width, depth),
                               rtol=1e-10, atol=1e-10)


def test_gradients_equal_poa_formulation():
    vit = tiny_vit().double().train()
    x = images().double()
    target = torch.randn(2, 17, 32, dtype=torch.float64)
    (elastic_forward_features(vit, x, 32, 3) * target).sum().backward()
    folded = {k: None if p.grad is None else p.grad.clone() for k, p in vit.named_parameters()}
    vit.zero_grad(set_to_none=True)
    (poa_reference(vit, x, 32, 3) * target).sum().backward()
    for k, p in vit.named_parameters():
        if p.grad is None:
            assert folded[k] is None, k
        else:
            torch.testing.assert_close(folded[k], p.grad, rtol=1e-9, atol=1e-12, msg=k)


def test_gradient_checkpointing_gives_the_same_gradients():
    vit = tiny_vit(drop_path_rate=0.2).train()
    x, target = images(), torch.randn(2, 17, 32)
    grads = []
    for checkpointing in (False, True):
        vit.set_grad_checkpointing(checkpointing)
        vit.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        (elastic_forward_features_list(vit, [x], 32, 3, pack=True)[0] * target).sum().backward()
        grads.append({k: p.grad for k, p in vit.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


# -- gradients land in exactly the active slices --------------------------------------------------
def active_mask(name: str, shape: torch.Size, width: int) -> torch.Tensor:
    """Which entries of intact parameter `name` the (width, ·) sub-network uses (mlp_ratio 4, qkv blocks)."""
    m = torch.zeros(shape, dtype=torch.bool)
    hidden = 4 * width
    if name.endswith("attn.qkv.weight"):
        for i in range(3):
            m[i * D_MAX: i * D_MAX + width, :width] = True
    elif name.endswith("attn.qkv.bias"):
        for i in range(3):
            m[i * D_MAX: i * D_MAX + width] = True
    elif name.endswith("attn.proj.weight"):
        m[:width, :width] = True
    elif name.endswith("mlp.fc1.weight"):
        m[:hidden, :width] = True
    elif name.endswith("mlp.fc1.bias"):
        m[:hidden] = True
    elif name.endswith("mlp.fc2.weight"):
        m[:width, :hidden] = True
    elif name in ("cls_token", "pos_embed"):
        m[..., :width] = True
    else:  # patch embed, norms, layer scale, output biases: the leading `width` along dim 0
        m[:width] = True
    return m


@pytest.mark.parametrize("width, depth", [(32, 3), (16, 2), (48, 6)])
def test_gradients_only_and_all_in_active_slices(width, depth):
    vit = tiny_vit().train()
    active = set(block_ids(L_MAX, depth))
    out = elastic_forward_features(vit, images(), width, depth)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in vit.named_parameters():
        if name.startswith("blocks.") and int(name.split(".")[1]) not in active:
            assert p.grad is None, f"{name}: inactive block got a gradient"
            continue
        assert p.grad is not None, name
        m = active_mask(name, p.shape, width)
        assert torch.count_nonzero(p.grad[~m]) == 0, f"{name}: gradient outside the active slice"
        if name.endswith("attn.qkv.bias"):  # a key bias shifts every logit of a query alike: zero gradient
            m[D_MAX: 2 * D_MAX] = False
        assert torch.count_nonzero(p.grad[m]) == m.sum(), f"{name}: part of the active slice got no gradient"


def test_gradients_reach_the_intact_parameters_not_copies():
    vit = tiny_vit()
    sd = sliced_state_dict(vit, 32, 3)
    assert all(v.requires_grad for v in sd.values())
    assert sd["blocks.0.norm1.weight"].data_ptr() == vit.blocks[0].norm1.weight.data_ptr()  # a view
    assert sliced_state_dict(vit, D_MAX, L_MAX)["blocks.5.attn.qkv.weight"] is vit.blocks[5].attn.qkv.weight


# -- extraction -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg", "num_classes": 4}])
def test_extracted_model_loads_into_timm_strict_with_same_output(kwargs):
    vit = tiny_vit(**kwargs)
    vit.pretrained_cfg["crop_pct"] = 1.0
    x = images()
    for width, depth in [(32, 3), (48, 5)]:
        sub = extract(vit, width, depth).eval()
        assert sub.pretrained_cfg == vit.pretrained_cfg
        assert all(p.requires_grad for n, p in sub.named_parameters() if n != "pos_embed")
        assert not any(p.data_ptr() == q.data_ptr() for p in sub.parameters() for q in vit.parameters())
        timm_model = TimmViT(**timm_kwargs(sub)).eval()
        timm_model.load_state_dict(sub.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(timm_model.forward_features(x), sub.forward_features(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(timm_model(x), sub(x), rtol=0, atol=1e-5)


def test_extracted_model_publishes_and_reloads(isolated_zoo_home):
    vit = zoo.create_model("vit_nano_patch4_32", init_values=1e-5)
    sub = extract(vit, 64, 2)
    assert sub.zoo_arch == "vit_nano_patch4_32" and sub.zoo_args["embed_dim"] == 64 and sub.zoo_args["num_heads"] == 2
    folder = zoo.publish(sub, "vit_nano_patch4_32.poa_w64d2", {"elastic": sub.elastic})
    loaded = zoo.load(folder)
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), sub.eval().forward_features(x), rtol=0, atol=1e-6)
    assert loaded.zoo_card["elastic"]["block_ids"] == [0, 3]


# -- official POA checkpoints --------------------------------------------------------------------------
def official_poa_checkpoint(vit: VisionTransformer) -> dict:
    """`teacher_checkpoint.pth` of alipay/POA for this intact model: elastic layers wrapped one level down
    (DynamicLayerNorm.norm, DynamicLinear.linear), plus mask_token and a DINO head the conversion drops."""
    wrapped = ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    teacher = {}
    for key, value in vit.state_dict().items():
        for layer in wrapped:
            for param in ("weight", "bias"):
                suffix = f".{layer}.{param}"
                if key.startswith("blocks.") and key.endswith(suffix):
                    inner = "norm" if layer.startswith("norm") else "linear"
                    key = key[: -len(suffix)] + f".{layer}.{inner}.{param}"
        if key in ("norm.weight", "norm.bias"):
            key = "norm.norm." + key.split(".")[1]
        teacher["backbone." + key] = value.clone()
    teacher["backbone.mask_token"] = torch.zeros(1, vit.embed_dim)
    teacher["dino_head.mlp.0.weight"] = torch.randn(32, vit.embed_dim)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(50, 1)
    return {"teacher": teacher}


def test_official_layout_is_what_the_test_builds():
    ckpt = official_poa_checkpoint(tiny_vit())["teacher"]
    for key in ("backbone.blocks.3.norm1.norm.weight", "backbone.blocks.3.attn.qkv.linear.weight",
                "backbone.blocks.3.mlp.fc2.linear.bias", "backbone.blocks.3.ls2.gamma", "backbone.norm.norm.bias",
                "backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.mask_token"):
        assert key in ckpt, key


@pytest.mark.parametrize("width, depth", [(32, 3), (64, 6), (16, 4)])
def test_poa_to_vit_equals_sliced_intact_model(width, depth):
    vit = tiny_vit()
    ckpt = official_poa_checkpoint(vit)
    got = poa_to_vit(ckpt, width, depth, head_dim=HEAD)
    want = sliced_state_dict(vit, width, depth)
    assert sorted(got) == sorted(want) and "norm.weight" in got and "mask_token" not in got
    for k in want:
        assert torch.equal(got[k], want[k].detach()), k
    # the backbone alone (as zoo's checkpoint reader unwraps it) converts the same
    assert all(torch.equal(v, got[k]) for k, v in poa_to_vit(
        {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")},
        width, depth, head_dim=HEAD).items())
    model = TimmViT(**timm_kwargs(extract(vit, width, depth)))
    model.load_state_dict(got, strict=True)


def test_poa_model_matches_the_elastic_forward():
    vit = tiny_vit().eval()
    model = poa_model(official_poa_checkpoint(vit), 32, 3, head_dim=HEAD).eval()
    assert model.elastic == {"width": 32, "depth": 3, "block_ids": [0, 2, 5], "parent_width": 64, "parent_depth": 6}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), elastic_forward_features(vit, x, 32, 3), rtol=0, atol=1e-6)


def test_poa_conversion_refuses_bad_input():
    vit = tiny_vit()
    ckpt = official_poa_checkpoint(vit)
    with pytest.raises(CheckpointMismatchError, match=r"not an official POA checkpoint.*--arch ARCH"):
        poa_to_vit(vit.state_dict(), 32, 3, head_dim=HEAD)
    with pytest.raises(CheckpointMismatchError, match=r"not an official POA checkpoint"):  # DINOv2-style, not elastic
        poa_to_vit({"teacher": {"backbone." + k: v for k, v in vit.state_dict().items()}}, 32, 3, head_dim=HEAD)
    with pytest.raises(ConfigError, match=r"width 96 exceeds the intact model's 64; valid widths: 16, 32, 48, 64"):
        poa_to_vit(ckpt, 96, 3, head_dim=HEAD)
    with pytest.raises(ConfigError, match=r"width 32 is not a positive multiple of the head size 64"):
        poa_to_vit(ckpt, 32, 3)  # POA's own head size
    with pytest.raises(ConfigError, match=r"depth 7 is outside 1\.\.6"):
        poa_to_vit(ckpt, 32, 7, head_dim=HEAD)
    with pytest.raises(CheckpointMismatchError, match=r"max_depth=24 does not match .* \(6\)"):
        poa_to_vit(ckpt, 32, 3, max_depth=24, head_dim=HEAD)


def test_cli_converts_an_official_poa_checkpoint(tmp_path, isolated_zoo_home, capsys):
    from zoo.cli import main
    from zoo.hub import store_dir

    vit = tiny_vit().eval()
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(official_poa_checkpoint(vit), path)
    name = "vit_base_patch16_224.poa_w32d3"
    assert main(["convert", str(path), name, "--from", "poa", "--width", "32", "--depth", "3", "--head-dim", "16"]) == 0
    folder = store_dir() / name
    assert f"published {folder}" in capsys.readouterr().out
    model = zoo.load(folder)
    card = model.zoo_card
    assert card["elastic"] == {"width": 32, "depth": 3, "block_ids": [0, 2, 5], "parent_width": 64, "parent_depth": 6}
    assert card["provenance"]["converted_from"] == "teacher_checkpoint.pth"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), elastic_forward_features(vit, x, 32, 3), rtol=0, atol=1e-6)
    assert main(["convert", str(path), str(tmp_path / "sub.safetensors"), "--from", "poa", "--width", "48",
                 "--depth", "2", "--head-dim", "16"]) == 0
    assert zoo.load(tmp_path / "sub.safetensors").embed_dim == 48
    # a size outside the model, a missing size, a plain checkpoint: one-line errors, exit status 2
    assert main(["convert", str(path), "vit_base_patch16_224.bad", "--from", "poa", "--width", "80", "--depth", "3",
                 "--head-dim", "16"]) == 2
    assert "width 80 exceeds the intact model's 64; valid widths: 16, 32, 48, 64" in capsys.readouterr().err
    assert main(["convert", str(path), "vit_base_patch16_224.bad", "--from", "poa"]) == 2
    assert "--from poa needs the sub-network's --width and --depth" in capsys.readouterr().err
    plain = tmp_path / "plain.pth"
    torch.save(vit.state_dict(), plain)
    assert main(["convert", str(plain), "vit_base_patch16_224.bad", "--from", "poa", "--width", "32", "--depth", "3"]) == 2
    assert "not an official POA checkpoint" in capsys.readouterr().err
    assert main(["convert", str(plain), "vit_base_patch16_224.bad"]) == 2
    assert "needs --arch ARCH" in capsys.readouterr().err
