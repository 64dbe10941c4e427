"""Medical MAE recipe: a 1-channel (grey) encoder with NIH normalisation, mask 0.9 (10% visible), crop scale
0.5-1, and a grey export that zoo's evaluation (kNN on the RGB built-in digits) runs on; its bad input."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import zoo
from zoo.data.builtin import materialize
from zoo.data.transforms import eval_transform, train_transform
from zoo.errors import ConfigError
from zoo.eval.protocols import evaluate
from zoo.recipes.medical_mae import NIH_MEAN, NIH_STD, MedicalMAE
from zoo.registry import RECIPES

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny(**kw) -> MedicalMAE:
    return MedicalMAE("vit_nano_patch4_32", **{**TINY, **kw})


def test_encoder_sees_one_grey_channel():
    model = tiny()
    cfg = model.encoder.pretrained_cfg
    assert model.encoder.patch_embed.proj.in_channels == 1 and model.in_chans == 1
    assert cfg["input_size"] == (1, 32, 32) and cfg["mean"] == (0.5056,) and cfg["std"] == (0.252,)
    assert model.mask_ratio == 0.9 and model.norm_pix_loss is False
    assert model.decoder.decoder_pred.out_features == 4 * 4 * 1
    # the training transform turns an RGB sample into one grey ("L") channel, NIH-normalised
    sample = {"image": Image.new("RGB", (40, 40), (200, 100, 50))}
    out = model.data_spec().sample_transform(model.backbone())(sample)["image"]
    grey = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0)) / 255
    assert out.shape == (1, 32, 32)
    torch.testing.assert_close(out, torch.full((1, 32, 32), (grey - NIH_MEAN) / NIH_STD), atol=1e-5, rtol=0)
    res = model.training_step({"image": out.unsqueeze(0).repeat(2, 1, 1, 1)}, 0)
    assert torch.isfinite(res["loss"])


def test_ten_percent_of_the_tokens_are_visible():
    model = tiny()
    N = 64
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    out = model.forward_masked(torch.randn(3, 1, 32, 32))
    K = int(N * 0.1)
    assert K == 6 and seen == [1 + K] and out.latent.shape[1] == 1 + K
    assert (out.mask.sum(1) == N - K).all()


def test_crop_scale_is_half_to_whole():
    spec = tiny().data_spec()
    assert spec.train_transform == {"scale": (0.5, 1.0), "hflip": 0.5, "interpolation": "bicubic"}
    ops = train_transform(tiny().encoder.pretrained_cfg, **spec.train_transform).transforms
    crop = next(op for op in ops if isinstance(op, v2.RandomResizedCrop))
    assert crop.scale == (0.5, 1.0) and crop.interpolation == v2.InterpolationMode.BICUBIC
    assert any(isinstance(op, v2.RandomHorizontalFlip) for op in ops)
    torch.manual_seed(0)
    image = torch.zeros(1, 100, 100)
    areas = [p["height"] * p["width"] / 1e4 for p in (crop.make_params([image]) for _ in range(300))]
    assert min(areas) >= 0.5 - 0.02 and max(areas) <= 1.0 and min(areas) < 0.6  # the whole range, not below half


def test_grey_export_loads_by_name_and_runs_knn_on_digits(tmp_path):
    model = tiny()
    name = "vit_nano_patch4_32.medical_mae_test"
    zoo.hub.publish(model.export(name)[name], name)
    loaded = zoo.load(name)
    assert loaded.pretrained_cfg["input_size"][0] == 1 and loaded.patch_embed.proj.in_channels == 1
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    digit = Image.new("RGB", (32, 32), (255, 255, 255))  # the built-in digits are RGB images
    assert eval_transform(loaded)(digit).shape == (1, 32, 32)  # the eval transform greys them for this model
    train = materialize("digits", "train", 64, root=tmp_path / "data")
    val = materialize("digits", "val", 32, root=tmp_path / "data")
    res = evaluate(loaded, train, val, protocols=("knn",), k=5)
    assert math.isfinite(res["knn_top1"]) and 0 <= res["knn_top1"] <= 100


def test_rgb_input_with_a_grey_normalisation_is_an_error():
    with pytest.raises(ConfigError, match=r"mean \[0.5056\] has 1 value\(s\) for in_chans=3") as e:
        tiny(in_chans=3, mean=[0.5056])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="std"):
        tiny(in_chans=1, std=[0.2, 0.2, 0.2])
    # the paper's own RGB-loaded X-rays: NIH statistics repeated on each channel
    rgb = tiny(in_chans=3)
    assert rgb.encoder.pretrained_cfg["mean"] == (0.5056,) * 3 and rgb.encoder.patch_embed.proj.in_channels == 3
    with pytest.raises(ConfigError, match="crop_scale"):
        tiny(crop_scale=(0.5, 1.5))
    with pytest.raises(ConfigError, match="in_chans must be a positive int"):
        tiny(in_chans=0)


def test_registered_with_its_cpu_recipe():
    entry = RECIPES.get("medical_mae")
    assert entry.factory is MedicalMAE and entry.meta["cpu_recipe"] == "medical_mae_vit_tiny_patch4_32_digits"
