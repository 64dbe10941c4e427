"""UNIP's pieces: the ViT attention hooks (logits and (q, k) from the forward itself, a last block with its own
head count), timm ViTs as zoo ViTs, the distillation loss against a direct computation, the recipe's teacher,
layer and student checks, InfMix data, and official UNIP checkpoints. The NMI analysis is tested in
test_attention_analysis.py; the registry-wide test trains, resumes and publishes the CPU recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.convert import as_zoo_vit, from_timm, timm_config, unip_model
from zoo.errors import ConfigError, ZooError
from zoo.models.vit import VisionTransformer, timm_kwargs, vit_kwargs
from zoo.recipes.unip import UNIP, InfMix, attention_distillation_loss, hybrid_layer_from

SMALL = dict(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=3)


def small_vit(**kw) -> VisionTransformer:
    return VisionTransformer(**{**SMALL, **kw}).eval()


# -- the hooks ----------------------------------------------------------------------------------
def test_hooked_logits_equal_an_explicit_recomputation():
    torch.manual_seed(0)
    vit, x = small_vit(last_heads=6), torch.randn(2, 3, 16, 16)
    logits = vit.attention_logits(x, [0, 1, 2])
    h = vit.embed(x)
    for i, blk in enumerate(vit.blocks):
        qkv = blk.attn.qkv(blk.norm1(h))  # (B, N, 3·D): q, k, v each split into this block's heads
        heads = blk.attn.num_heads
        q, k, _ = qkv.reshape(2, h.shape[1], 3, heads, 48 // heads).permute(2, 0, 3, 1, 4)
        expect = q @ k.transpose(-2, -1) / (48 // heads) ** 0.5
        assert logits[i].shape == (2, heads, 17, 17)
        torch.testing.assert_close(logits[i], expect, rtol=1e-5, atol=1e-5)
        h = blk(h)
    assert logits[2].shape[1] == 6 and vit.blocks[2].attn.scale == 8**-0.5  # the last block: 6 heads of 8


def test_return_qk_leaves_the_block_output_unchanged_and_stops_early():
    torch.manual_seed(0)
    vit, x = small_vit(), torch.randn(2, 3, 16, 16)
    tokens = vit.embed(x)
    out, (q, k) = vit.blocks[0](tokens, return_qk=True)
    torch.testing.assert_close(out, vit.blocks[0](tokens))
    torch.testing.assert_close(torch.stack(vit.blocks[0].qk(tokens)), torch.stack((q, k)))
    calls = []
    hooks = [blk.mlp.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, blk in enumerate(vit.blocks)]
    vit.forward_qk(x, 1)  # block 1's attention: block 0 runs whole, block 1 only up to q and k, block 2 not at all
    assert calls == [0]
    for hk in hooks:
        hk.remove()
    maps = vit.attention_maps(x, -1)[2]
    torch.testing.assert_close(maps, vit.get_last_selfattention(x))
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 17))


def test_layer_and_head_errors_say_what_fits():
    vit = small_vit()
    with pytest.raises(ZooError, match=r"use 0\.\.2"):
        vit.forward_qk(torch.randn(1, 3, 16, 16), 3)
    with pytest.raises(ZooError, match="head counts that fit: .*16"):
        small_vit(last_heads=5)


def test_last_heads_round_trips_through_kwargs_and_publish_but_not_timm():
    torch.manual_seed(0)
    vit = small_vit(last_heads=6)
    kwargs = vit_kwargs(vit)
    assert kwargs["last_heads"] == 6 and vit_kwargs(small_vit())["last_heads"] is None
    again = VisionTransformer(**kwargs).eval()
    again.load_state_dict(vit.state_dict())
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(again.forward_features(x), vit.forward_features(x))
    with pytest.raises(ZooError, match="one head count"):
        timm_kwargs(vit)
    assert timm_config(vit) is None  # a published folder does not claim timm can rebuild it
    model = zoo.create_model("vit_nano_patch4_32", last_heads=8)
    zoo.publish(model, "vit_nano_patch4_32.lastheads")
    loaded = zoo.load("vit_nano_patch4_32.lastheads")
    assert loaded.blocks[-1].attn.num_heads == 8 and loaded.blocks[0].attn.num_heads == 4


def test_timm_vits_become_zoo_vits_with_the_same_forward(tmp_path):
    import timm

    torch.manual_seed(0)
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4).eval()
    z = from_timm(t)
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(z, VisionTransformer) and as_zoo_vit(z) is z
    torch.testing.assert_close(z.forward_features(x), t.forward_features(x))
    assert len(z.attention_maps(x)) == 12
    timm.models.save_for_hf(t, tmp_path / "hub_folder", safe_serialization=True)  # a Hub repo's layout, offline
    hub = as_zoo_vit(zoo.load(str(tmp_path / "hub_folder")))
    torch.testing.assert_close(hub.forward_features(x), t.forward_features(x))
    with pytest.raises(ZooError, match="is not a ViT"):
        as_zoo_vit(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ZooError, match="register tokens"):
        from_timm(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28))


# -- the loss ------------------------------------------------------------------------------------
def test_distillation_loss_equals_the_kl_of_the_attention_maps():
    torch.manual_seed(0)
    teacher, student = small_vit(num_heads=4), small_vit(embed_dim=32, num_heads=2, last_heads=4)
    x = torch.randn(3, 3, 16, 16)
    loss = attention_distillation_loss(teacher, 1, student, x)
    p_t = teacher.attention_maps(x, 1)[1]
    p_s = student.attention_maps(x, -1)[2]
    direct = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    assert student.blocks[2].mlp.fc1.weight.grad is None and student.norm.weight.grad is None  # as officially
    same = attention_distillation_loss(teacher, 2, teacher, x).detach()  # a model against itself: zero
    assert abs(float(same)) < 1e-6


# -- the recipe ----------------------------------------------------------------------------------
@pytest.fixture
def teacher_name() -> str:
    torch.manual_seed(0)
    zoo.publish(zoo.create_model("vit_small_patch4_32", pos_embed="sincos"), "vit_small_patch4_32.t")
    return "vit_small_patch4_32.t"


def test_recipe_builds_the_student_with_the_teachers_heads_and_learns(teacher_name):
    torch.manual_seed(0)
    m = UNIP("vit_tiny_patch4_32", teacher=teacher_name, teacher_layer=6)
    assert m.student.blocks[-1].attn.num_heads == 6 and m.student.blocks[0].attn.num_heads == 3
    assert m.student.pretrained_cfg["mean"] == (0.3801,) * 3
    assert "teacher" in m.frozen_modules() and not any(k.startswith("teacher.") for k in m.state_dict())
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(15):
        loss = m.training_step({"image": x}, 0)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    card = m.export("vit_tiny_patch4_32.u")["vit_tiny_patch4_32.u"].card["unip"]
    assert card["teacher"] == teacher_name and card["teacher_layer"] == 6 and card["last_heads"] == 6


def test_recipe_bad_input_is_one_line(teacher_name, tmp_path):
    with pytest.raises(ConfigError, match=r"out of range for a 8-layer teacher: use 1\.\.8"):
        UNIP("vit_tiny_patch4_32", teacher=teacher_name, teacher_layer=9)
    with pytest.raises(ConfigError, match="teacher's 6 heads.*fit"):
        UNIP("vit_nano_patch4_32", teacher=teacher_name, teacher_layer=2)  # 128 channels do not split into 6
    zoo.publish(zoo.create_model("vit_tiny_patch8_64"), "vit_tiny_patch8_64.t")
    with pytest.raises(ConfigError, match="patch grid|token grid"):
        UNIP("vit_tiny_patch4_32", teacher="vit_tiny_patch8_64.t", teacher_layer=2)
    zoo.publish(zoo.create_model("resnet18"), "resnet18.t")
    with pytest.raises(ZooError, match="is not a ViT"):
        UNIP("vit_tiny_patch4_32", teacher="resnet18.t", teacher_layer=2)
    with pytest.raises(ConfigError, match="make it with `zoo pretrain mae_vit_small_patch4_32_scenes`"):
        UNIP("vit_tiny_patch4_32", teacher="vit_small_patch4_32.mae_scenes", teacher_layer=6)
    with pytest.raises(ConfigError, match="do not set it"):
        UNIP("vit_tiny_patch4_32", teacher=teacher_name, teacher_layer=6, last_heads=6)


def test_teacher_layer_from_the_analysis_json(tmp_path):
    report = tmp_path / "attention.json"
    report.write_text(json.dumps({"hybrid_layer": {"index": 4, "layer": 5, "nmi": 0.3}}))
    assert hybrid_layer_from(str(report), 8) == 5 and hybrid_layer_from(3, 8) == 3
    with pytest.raises(ConfigError, match="neither a layer number"):
        hybrid_layer_from(str(tmp_path / "missing.json"), 8)


def test_infmix_uses_the_thermal_rendering_where_present_else_grey_rgb():
    cfg = {"input_size": (3, 8, 8), "mean": (0.0,) * 3, "std": (1.0,) * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    mix = InfMix(cfg, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    rgb = Image.fromarray(np.full((8, 8, 3), (200, 10, 10), dtype=np.uint8))
    thermal = Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), "L")
    hot = mix({"image": rgb, "thermal": thermal})["image"]
    torch.testing.assert_close(hot, torch.full((3, 8, 8), 77 / 255))
    grey = mix({"image": rgb})["image"]
    assert grey.shape == (3, 8, 8) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(float(grey[0, 0, 0]) - rgb.convert("L").getpixel((0, 0)) / 255) < 1e-6


def test_weighted_sources_need_resampling():
    from zoo.config import load_config

    with pytest.raises(ConfigError, match="data.weights"):
        load_config("unip_vit_tiny_patch4_32_scenes", ["data.resampled=false"])


# -- official checkpoints ------------------------------------------------------------------------
def test_official_unip_checkpoints_load_with_their_untrained_parts_reported(tmp_path):
    torch.manual_seed(0)
    src = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=3, num_heads=3, last_heads=16,
                            pos_embed="sincos")
    sd = src.state_dict()
    for name in ("blocks.2.norm2", "norm"):  # as released: never trained, so still LayerNorm's init
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.ones(192), torch.zeros(192)
    src.load_state_dict(sd)
    ckpt = tmp_path / "unip_t.pth"
    torch.save({"model": sd, "epoch": 99}, ckpt)
    model = unip_model(torch.load(ckpt, weights_only=True), last_heads=16)
    assert model.blocks[-1].attn.num_heads == 16 and model.blocks[0].attn.num_heads == 3
    assert model.unip["untrained"] == ["blocks.2.norm2", "blocks.2.mlp", "norm"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval().forward_features(x), src.eval().forward_features(x))
    out = subprocess.run([sys.executable, "-m", "zoo", "convert", str(ckpt), "vit_tiny_patch4_32.unip_t", "--from", "unip",
                          "--last-heads", "16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = zoo.load("vit_tiny_patch4_32.unip_t")
    assert loaded.blocks[-1].attn.num_heads == 16 and loaded.zoo_card["unip"]["untrained"][-1] == "norm"
    bad = subprocess.run([sys.executable, "-m", "zoo", "convert", str(ckpt), "x.y", "--last-heads", "16"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "add --from unip" in bad.stderr
