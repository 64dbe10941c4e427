"""Official FLAME checkpoints (MIV-XJTU/FLAME) into zoo's FLAME: a small fake one built from the real open_clip
VisionTransformer, saved as FLAME's training loop saves it, must give FLAME's encode_image exactly."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import zoo
from zoo.convert import flame_model, is_official_flame
from zoo.errors import CheckpointMismatchError, ZooError

open_clip_transformer = pytest.importorskip("open_clip.transformer")

IMG, PATCH, WIDTH, DEPTH, EMBED, HIDDEN = 32, 4, 128, 2, 48, 64  # width 128: flame_vit_nano_patch4_32's tower


def fake_flame(heads: int, img: int = IMG, patch: int = PATCH, width: int = WIDTH, depth: int = DEPTH
               ) -> tuple[nn.Module, nn.Sequential, dict]:
    """(open_clip tower, projector, checkpoint) as FLAME-Mistral-Nemo's config builds and main.py saves them:
    GELU, ln_pre, pool_type avg, LayerNorm eps 1e-5; mm = Linear, GELU, Linear, LayerNorm; `module.` keys."""
    torch.manual_seed(0)
    visual = open_clip_transformer.VisionTransformer(
        image_size=img, patch_size=patch, width=width, layers=depth, heads=heads, mlp_ratio=4.0, output_dim=32,
        pool_type="avg", act_layer=nn.GELU, norm_layer=open_clip_transformer.LayerNorm)
    mm = nn.Sequential(nn.Linear(width, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, EMBED), open_clip_transformer.LayerNorm(EMBED))
    with torch.no_grad():  # every tensor random, norms included, so a swapped key cannot go unnoticed
        for m in [*visual.modules(), *mm.modules()]:
            for name, p in m.named_parameters(recurse=False):
                scale = 1.0 if isinstance(m, nn.LayerNorm) and name == "weight" else 0.0
                p.copy_(scale + 0.2 * torch.randn_like(p))
    sd = OrderedDict()
    for k, v in visual.state_dict().items():
        sd["module.visual." + k] = v
    for k, v in mm.state_dict().items():
        sd["module.mm." + k] = v
    sd["module.logit_scale"] = torch.tensor(2.3)
    sd["module.logit_bias"] = torch.tensor(-9.5)
    sd["module.text.model.embed_tokens.weight"] = torch.randn(10, EMBED)  # the frozen LLM, which is dropped
    ckpt = {"epoch": 32, "name": "fake-flame", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    return visual.eval(), mm.eval(), ckpt


@torch.no_grad()
def reference(visual: nn.Module, mm: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """FLAME's encode_image: open_clip tokens after the blocks, before ln_post (FLAME's get_features), the
    projector on every token, then _global_pool('avg'): the mean over the patch tokens."""
    x = visual.transformer(visual._embeds(images))
    return mm(x)[:, 1:].mean(1)


def test_flame_checkpoint_converts_exactly(tmp_path):
    visual, mm, ckpt = fake_flame(heads=4)
    path = tmp_path / "epoch_32.pt"
    torch.save(ckpt, path)
    model = flame_model(torch.load(path, weights_only=True), arch="flame_vit_nano_patch4_32", head_width=32).eval()

    images = torch.randn(3, 3, IMG, IMG)
    got = model.encode_image(images)
    assert got.shape == (3, EMBED)
    torch.testing.assert_close(got, reference(visual, mm, images), atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(2.3) and model.logit_bias.item() == pytest.approx(-9.5)
    assert not any(k.startswith("text.") for k in model.state_dict())
    v = model.visual
    assert (len(v.blocks), v.blocks[0].attn.num_heads, v.blocks[0].norm1.eps) == (DEPTH, 4, 1e-5)
    assert v.patch_embed.proj.bias is None and not isinstance(v.norm_pre, nn.Identity)
    assert tuple(model.pretrained_cfg["mean"]) == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_pre_norm_vit_loads_into_timm_unchanged():
    """pre_norm / norm_eps keep the zoo ViT timm's: same keys (no patch bias, norm_pre) and the same forward."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from zoo.convert import to_timm
    from zoo.models.vit import VisionTransformer, vit_kwargs

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, pre_norm=True,
                            norm_eps=1e-5).eval()
    assert vit_kwargs(vit)["pre_norm"] is True and vit_kwargs(vit)["norm_eps"] == 1e-5
    kwargs, sd = to_timm(vit)
    timm_vit = TimmViT(**kwargs).eval()
    timm_vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.forward_features(x), timm_vit.forward_features(x), atol=1e-5, rtol=1e-5)


def test_zoo_load_detects_a_flame_checkpoint(tmp_path):
    visual, mm, ckpt = fake_flame(heads=2)  # FLAME's head width, 64: no argument needed
    assert is_official_flame(ckpt) and not is_official_flame({"state_dict": {"module.visual.conv1.weight": 0}})
    path = tmp_path / "epoch_32.pt"
    torch.save(ckpt, path)
    model = zoo.load(str(path))
    assert model.zoo_arch == "flame_vit_nano_patch4_32" and model.zoo_card["format"] == "flame"
    images = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(model.encode_image(images), reference(visual, mm, images), atol=1e-5, rtol=1e-5)


def test_cli_convert_from_flame_publishes(tmp_path, capsys):
    from zoo.cli import main

    visual, mm, ckpt = fake_flame(heads=2)
    path = tmp_path / "epoch_32.pt"
    torch.save(ckpt, path)
    assert main(["convert", str(path), "flame_vit_nano_patch4_32.official_fake", "--from", "flame"]) == 0
    model = zoo.load("flame_vit_nano_patch4_32.official_fake")
    images = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(model.encode_image(images), reference(visual, mm, images), atol=1e-5, rtol=1e-5)


def test_not_a_flame_checkpoint_is_a_one_line_error():
    vit = zoo.create_model("vit_nano_patch4_32")
    with pytest.raises(CheckpointMismatchError, match="not an official FLAME checkpoint") as err:
        flame_model({"state_dict": {"module." + k: v for k, v in vit.state_dict().items()}})
    assert "\n" not in str(err.value)
    _, _, ckpt = fake_flame(heads=2)
    with pytest.raises(ZooError, match="128 wide"):
        flame_model(ckpt, arch="flame_vit_base_patch16_224")
