"""Converters: official MAE and DINO checkpoints into zoo ViTs, zoo ViTs into timm's VisionTransformer."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from functools import partial
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT

import zoo
from zoo.convert import to_timm
from zoo.models.vit import sincos_pos_embed_2d


def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's util/pos_embed.py formula, written independently from zoo's: (1 + grid², dim), cls row zero."""
    gh, gw = np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, -1)  # mesh[0] walks columns

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


class OfficialMAE(nn.Module):
    """The parameter layout of facebookresearch/mae `models_mae.MaskedAutoencoderViT` (timm blocks),
    with its encoder forward on an unmasked image, as the reference to convert from."""

    def __init__(self, img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, dec_dim=64, dec_depth=2):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        grid = int(n**0.5)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_sincos(embed_dim, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([TimmBlock(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(mae_sincos(dec_dim, grid)).float()[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([TimmBlock(dec_dim, 4, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * 3)
        with torch.no_grad():  # non-trivial norms so a mis-mapped LayerNorm would show
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def encode(self, x):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def test_sincos_matches_mae_formula():
    ours = sincos_pos_embed_2d(128, 8, 8)[0].double().numpy()
    assert np.allclose(ours, mae_sincos(128, 8), atol=1e-6)


@pytest.mark.parametrize("with_decoder", [True, False], ids=["full", "encoder_only"])
@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_official_mae_checkpoint_loads_with_same_features(tmp_path, with_decoder, pos_embed):
    ref = OfficialMAE().eval()
    sd = ref.state_dict()
    if not with_decoder:  # like mae_pretrain_vit_base.pth: encoder only
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_nano.pth"
    torch.save({"model": sd}, path)

    model = zoo.load(path, arch="vit_nano_patch4_32", pos_embed=pos_embed)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref.encode(x)
        got = model.forward_features(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with torch.no_grad():
        assert torch.allclose(model(x), expected[:, 0], atol=1e-5)  # cls pooling


def test_official_mae_training_checkpoint_needs_trust(tmp_path):
    """Training checkpoints carry argparse args: refused by weights_only, converted with --trust-pickle."""
    import argparse

    from zoo.cli import main

    ref = OfficialMAE().eval()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": ref.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae_vit_nano")}, path)
    with pytest.raises(zoo.errors.UnsafeCheckpointError, match="--trust-pickle"):
        zoo.load(path, arch="vit_nano_patch4_32")
    out = tmp_path / "mae_nano.safetensors"
    assert main(["convert", str(path), str(out), "--arch", "vit_nano_patch4_32", "--trust-pickle"]) == 0
    model = zoo.load(out)  # the card travels inside the safetensors file: no arch needed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref.encode(x), atol=1e-5)


def test_mae_checkpoint_at_other_resolution_resamples_pos_embed(tmp_path):
    ref = OfficialMAE(img_size=48)  # 12x12 grid into an 8x8 model
    path = tmp_path / "mae48.pth"
    torch.save({"model": ref.state_dict()}, path)
    model = zoo.load(path, arch="vit_nano_patch4_32")
    assert model.pos_embed.shape == (1, 65, 128)


DINO_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)


def dino_vit(seed: int, **sizes) -> TimmViT:
    """facebookresearch/dino's `vision_transformer.VisionTransformer` uses timm's parameter names: a timm ViT
    without a classifier stands in for it."""
    torch.manual_seed(seed)
    return _randomize_norms(TimmViT(**{**DINO_VIT, **sizes}, num_classes=0)).eval()


def dino_head(prefix: str, embed_dim: int, seed: int, out_dim: int = 100) -> dict[str, torch.Tensor]:
    """The keys of DINO's `DINOHead` inside `MultiCropWrapper`: a 3-layer MLP, then a weight-normed last layer."""
    g = torch.Generator().manual_seed(seed)
    hidden, bottleneck = 96, 32
    shapes = {"mlp.0.weight": (hidden, embed_dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
              "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
              "last_layer.weight_g": (out_dim, 1), "last_layer.weight_v": (out_dim, bottleneck)}
    return {f"{prefix}head.{k}": torch.randn(shape, generator=g) for k, shape in shapes.items()}


def dino_checkpoint(form: str, teacher: TimmViT, student: TimmViT) -> dict:
    """A checkpoint as facebookresearch/dino writes it (main_dino.py's save_dict, no `args`), or as released."""
    dim = teacher.embed_dim
    t = {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **dino_head("", dim, 1)}
    s = {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()}, **dino_head("module.", dim, 2)}
    if form == "full":
        return {"student": s, "teacher": t, "epoch": 100, "dino_loss": {"center": torch.randn(1, 100)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1, 2]}]}}
    if form == "teacher_only":
        return {"teacher": t}
    if form == "ibot_style":  # the teacher's backbone carries its masked-patch embedding
        return {"teacher": {**t, "backbone.masked_embed": torch.randn(1, dim)}, "student": s}
    if form == "backbone_only":  # like dino_deitsmall16_pretrain.pth
        return teacher.state_dict()
    raise ValueError(form)


@pytest.mark.parametrize("form", ["full", "teacher_only", "ibot_style", "backbone_only"])
def test_official_dino_checkpoint_loads_the_teacher_with_same_features(tmp_path, form):
    teacher, student = dino_vit(seed=0), dino_vit(seed=1)
    path = tmp_path / f"dino_{form}.pth"
    torch.save(dino_checkpoint(form, teacher, student), path)

    model = zoo.load(path, arch="vit_nano_patch4_32", embed_dim=64, depth=2, num_heads=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = teacher.forward_features(x)
        got = model.forward_features(x)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        assert not torch.allclose(got, student.forward_features(x), atol=1e-2), "loaded the student"
        assert torch.allclose(model(x), expected[:, 0], atol=1e-5)


def test_dino_checkpoint_into_wrong_arch_names_the_keys(tmp_path):
    path = tmp_path / "dino_full.pth"
    torch.save(dino_checkpoint("full", dino_vit(seed=0), dino_vit(seed=1)), path)
    with pytest.raises(zoo.errors.CheckpointMismatchError) as err:
        zoo.load(path, arch="vit_nano_patch4_32")  # 128 wide, 4 deep
    msg = str(err.value)
    assert "\n" not in msg
    assert "blocks.2.norm1.weight" in msg and "cls_token (1, 1, 64) vs model (1, 1, 128)" in msg
    assert "backbone." not in msg and "head." not in msg, "prefixes and the projection head leaked through"


def test_official_dino_training_checkpoint_needs_trust(tmp_path):
    """main_dino.py saves its argparse args: refused by weights_only, converted with --trust-pickle."""
    import argparse

    from zoo.cli import main

    nano = dict(embed_dim=128, depth=4, num_heads=4)  # vit_nano_patch4_32 as registered: `zoo convert` takes no overrides
    teacher, student = dino_vit(seed=0, **nano), dino_vit(seed=1, **nano)
    ckpt = dino_checkpoint("full", teacher, student)
    ckpt["args"] = argparse.Namespace(arch="vit_nano", patch_size=4, out_dim=100)
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    with pytest.raises(zoo.errors.UnsafeCheckpointError, match="--trust-pickle"):
        zoo.load(path, arch="vit_nano_patch4_32")
    out = tmp_path / "dino_nano.safetensors"
    assert main(["convert", str(path), str(out), "--arch", "vit_nano_patch4_32", "--trust-pickle"]) == 0
    model = zoo.load(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), teacher.forward_features(x), atol=1e-5)


def _randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"global_pool": "avg"}, {"num_classes": 10}, {"init_values": 1e-2}, {"pos_embed": "sincos"}],
    ids=["token", "avg", "head", "layerscale", "sincos"],
)
def test_export_loads_into_timm_strict_with_same_features(kwargs):
    model = _randomize_norms(zoo.create_model("vit_nano_patch4_32", **kwargs)).eval()
    timm_args, sd = to_timm(model)
    twin = TimmViT(**timm_args).eval()
    twin.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(twin.forward_features(x), model.forward_features(x), atol=1e-5)
        assert torch.allclose(twin(x), model(x), atol=1e-5)


def test_standard_shape_loads_into_timm_registered_model():
    """A zoo vit_small_patch16_224 is timm's vit_small_patch16_224, key for key."""
    model = _randomize_norms(zoo.create_model("vit_small_patch16_224")).eval()
    _, sd = to_timm(model)
    twin = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    twin.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-4)


def test_timm_state_dict_loads_into_zoo(tmp_path):
    """The other direction: a timm ViT checkpoint loads into the zoo ViT of the same name."""
    twin = _randomize_norms(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)).eval()
    path = tmp_path / "timm_vit_small.safetensors"
    from safetensors.torch import save_file

    save_file(twin.state_dict(), path)
    model = zoo.load(path, arch="vit_small_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-4)
