"""SatMAE++ recipe: the multi-scale targets (shapes and values), the upsampling head, the L1 over every pixel
next to MAE's masked MSE, the loss weights, multi-spectral input (a 5-channel model that trains and exports),
and its bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

import zoo
from zoo.data.builtin import generate
from zoo.errors import ConfigError
from zoo.recipes.satmae import (
    MultiScaleHead,
    MultiScaleTransform,
    SatMAE,
    UpsampleBlock,
    check_scales,
    multiscale_images,
    upsampled_l1,
)
from zoo.registry import RECIPES

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny(**kw) -> SatMAE:
    return SatMAE("vit_nano_patch4_32", **{**TINY, **kw})


def rgb_sample(size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return {"image": Image.fromarray(pixels, "RGB")}


# -- multi-scale targets -------------------------------------------------------------------------
def test_targets_2x_is_the_crop_and_1x_is_its_bilinear_half():
    """Whole-image 'crop' (scale 1-1, no flip) of a 64 px image: image_2x is the normalised image itself, and
    image is each 2x2 block's mean (bilinear at exactly half the size), both checked by hand."""
    sample = rgb_sample(64)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    t = MultiScaleTransform(["image"], 32, (2,), mean, std, crop_scale=(1.0, 1.0), hflip=0.0)
    out = t(sample)
    assert set(out) == {"image", "image_2x"}
    assert out["image_2x"].shape == (3, 64, 64) and out["image"].shape == (3, 32, 32)
    raw = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out["image_2x"], expected, atol=1e-5, rtol=0)
    blocks = expected.unfold(1, 2, 2).unfold(2, 2, 2).mean(dim=(-1, -2))  # 2x2 block means
    torch.testing.assert_close(out["image"], blocks, atol=1e-5, rtol=0)


def test_targets_of_a_random_crop_two_scales():
    """A random crop of a larger image at the top scale (4 x 32 = 128 px); each lower scale is the bilinear 0.5x
    of the one above, so the encoder's image is two halvings of the 4x target."""
    torch.manual_seed(1)
    t = MultiScaleTransform(["image"], 32, (2, 4), (0.5,) * 3, (0.25,) * 3)
    out = t(rgb_sample(150))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_4x": (3, 128, 128), "image_2x": (3, 64, 64), "image": (3, 32, 32)}
    half = lambda x: F.interpolate(x[None], scale_factor=0.5, mode="bilinear")[0]  # noqa: E731
    torch.testing.assert_close(out["image_2x"], half(out["image_4x"]))
    torch.testing.assert_close(out["image"], half(half(out["image_4x"])))
    assert not torch.allclose(out["image_4x"][:, :64, :64], out["image_2x"])  # a real resampling, not a slice


def test_multiscale_images_batched_matches_per_sample():
    top = torch.randn(3, 2, 16, 16)
    batched = multiscale_images(top, (2, 4))
    single = multiscale_images(top[1], (2, 4))
    for k in ("image", "image_2x", "image_4x"):
        torch.testing.assert_close(batched[k][1], single[k])
    assert batched["image"].shape == (3, 2, 4, 4)


# -- the head ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chans, n_scales", [(3, 1), (5, 2)])
def test_head_output_shapes(chans, n_scales):
    head = MultiScaleHead(chans, n_scales, proj_ratio=4)
    outs = head(torch.randn(2, chans, 8, 8))
    assert [tuple(o.shape) for o in outs] == [(2, chans, 8 * 2 ** (i + 1), 8 * 2 ** (i + 1)) for i in range(n_scales)]
    assert head.proj_up_conv.out_channels == 4 * chans and head.proj_up_conv.kernel_size == (1, 1)
    up = head.upsamplers[0].up_conv
    assert isinstance(up, nn.ConvTranspose2d) and (up.in_channels, up.out_channels) == (4 * chans, 4 * chans)
    assert (up.kernel_size, up.stride, up.padding) == ((4, 4), (2, 2), (1, 1))


def test_second_block_takes_the_first_blocks_features():
    block = UpsampleBlock(8, 2)
    feats, image = block(torch.randn(1, 8, 4, 4))
    assert feats.shape == (1, 8, 8, 8) and image.shape == (1, 2, 8, 8)
    head = MultiScaleHead(2, 2)
    seen = []
    head.upsamplers[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    head(torch.randn(1, 2, 4, 4))
    assert seen == [torch.Size([1, 8, 8, 8])]  # 4C features at 2x, not the C-channel image


# -- the losses ----------------------------------------------------------------------------------
def test_l1_covers_every_pixel_and_mse_only_removed_patches():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    batch = {"image": x, "image_2x": torch.randn(2, 3, 64, 64)}
    out = model.forward_masked(x, generator=torch.Generator().manual_seed(0))
    p = model.patch_size
    kept = int(torch.nonzero(out.mask[0] == 0)[0])
    removed = int(torch.nonzero(out.mask[0] == 1)[0])

    def pixel(n: int, scale: int) -> tuple[int, int]:  # the top-left pixel of patch n at that scale
        gy, gx = divmod(n, 32 // p)
        return gy * p * scale, gx * p * scale

    l1 = model.extra_losses(batch, x, out)["l1_2x"]
    for n in (kept, removed):  # the whole upsampled image counts, visible patches included
        changed = {**batch, "image_2x": batch["image_2x"].clone()}
        changed["image_2x"][0, 0, pixel(n, 2)[0], pixel(n, 2)[1]] += 3.0
        assert not torch.allclose(model.extra_losses(changed, x, out)["l1_2x"], l1)
    rec = model.reconstruction_loss(out.pred, model.targets(x), out.mask)
    for n, counts in ((kept, False), (removed, True)):  # the MSE target only matters on removed patches
        x2 = x.clone()
        x2[0, 0, pixel(n, 1)[0], pixel(n, 1)[1]] += 3.0
        changed = model.reconstruction_loss(out.pred, model.targets(x2), out.mask)
        assert torch.equal(changed, rec) is not counts


def test_upsampled_l1_is_the_mean_absolute_error():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.allclose(upsampled_l1(a, b), (a - b).abs().sum() / a.numel())
    with pytest.raises(ValueError, match="shape"):
        upsampled_l1(a, b[..., :4])


@pytest.mark.parametrize("scales, weights", [((2,), {"rec": 0.6, "l1_2x": 0.4}),
                                             ((2, 4), {"rec": 0.6, "l1_2x": 0.2, "l1_4x": 0.2})])
def test_loss_weights_and_total(scales, weights):
    model = tiny(scales=scales)
    assert model.loss_weights == pytest.approx(weights)
    assert model.norm_pix_loss is False
    x = torch.randn(2, 3, 32, 32)
    batch = {"image": x, **{f"image_{s}x": torch.randn(2, 3, 32 * s, 32 * s) for s in scales}}
    out = model.training_step(batch, 0)
    total = sum(w * out[f"loss_{k}"] for k, w in weights.items())
    assert torch.allclose(out["loss"], total)
    custom = tiny(scales=(2, 4), rec_weight=1.0, multiscale_weight=0.5, scale_weights=(0.25, 0.75))
    assert custom.loss_weights == pytest.approx({"rec": 1.0, "l1_2x": 0.125, "l1_4x": 0.375})


# -- multi-spectral ------------------------------------------------------------------------------
def test_multispectral_model_builds_trains_and_exports(tmp_path):
    model = tiny(channels=["image", "thermal", "depth"])
    enc = model.encoder
    assert enc.patch_embed.proj.in_channels == 5 and model.decoder.decoder_pred.out_features == 4 * 4 * 5
    assert enc.pretrained_cfg["mean"] == (0.485, 0.456, 0.406, 0.5, 0.5)
    assert enc.pretrained_cfg["std"] == (0.229, 0.224, 0.225, 0.25, 0.25)
    spec = model.data_spec()
    assert spec.fields == ("image", "thermal", "depth") and spec.builtin_size == 64
    samples = [spec.transform(s) for s in generate("scenes", 4, size=64)]
    batch = default_collate(samples)
    assert batch["image"].shape == (4, 5, 32, 32) and batch["image_2x"].shape == (4, 5, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.training_step(batch, 0)
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss_rec", "loss_l1_2x"}
    assert not torch.equal(before["head.upsamplers.0.proj_out.weight"], model.head.upsamplers[0].proj_out.weight)
    assert not torch.equal(before["encoder.blocks.0.attn.qkv.weight"], enc.blocks[0].attn.qkv.weight)
    name = "vit_nano_patch4_32.satmae_test5"
    zoo.hub.publish(model.export(name)[name], name)
    loaded = zoo.load(name)
    assert loaded.pretrained_cfg["input_size"][0] == 5 and tuple(loaded.pretrained_cfg["mean"]) == enc.pretrained_cfg["mean"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in enc.state_dict().items())


def test_fields_stack_in_order_with_their_normalisation():
    """image (RGB) then thermal then depth, each grey field normalised with 0.5 / 0.25 (whole-image crop, no flip)."""
    sample = next(iter(generate("scenes", 1, size=64)))
    model = tiny(channels=["image", "thermal", "depth"])
    cfg = model.encoder.pretrained_cfg
    t = MultiScaleTransform(model.channels, 32, (2,), cfg["mean"], cfg["std"], crop_scale=(1.0, 1.0), hflip=0.0)
    top = t(sample)["image_2x"]
    assert top.shape == (5, 64, 64)
    for c, field in ((3, "thermal"), (4, "depth")):
        grey = torch.from_numpy(np.array(sample[field])).float() / 255
        torch.testing.assert_close(top[c], (grey - 0.5) / 0.25, atol=1e-5, rtol=0)
    red = torch.from_numpy(np.array(sample["image"])[..., 0]).float() / 255
    torch.testing.assert_close(top[0], (red - 0.485) / 0.229, atol=1e-5, rtol=0)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scales", [[3], [4], [2, 8], [2, 4, 4], [], [1, 2], [2.0]])
def test_unreachable_scales(scales):
    with pytest.raises(ConfigError, match="not reachable.*2, 4, 8"):
        check_scales(scales)


def test_good_scales():
    assert check_scales(2) == (2,) and check_scales([2, 4]) == (2, 4) and check_scales((2, 4, 8)) == (2, 4, 8)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="not reachable"):
        tiny(scales=[3])
    with pytest.raises(ConfigError, match="in_chans=3 does not match.*5 channels"):
        tiny(channels=["image", "thermal", "depth"], in_chans=3)
    with pytest.raises(ConfigError, match=r"mean has 3 value\(s\) for the 4 input channels"):
        tiny(channels=["image", "thermal"], mean=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match=r"scale_weights has 1 value\(s\) for scales"):
        tiny(scales=[2, 4], scale_weights=[1.0])
    with pytest.raises(ConfigError, match="distinct sample field names"):
        tiny(channels=["image", "image"])


def test_small_training_images_say_which_size_is_needed():
    t = tiny().data_spec().transform
    with pytest.raises(ConfigError, match=r"48x48 px.*at least 64 px") as e:
        t(rgb_sample(48))
    assert "\n" not in str(e.value)
    t(rgb_sample(64))  # the top size itself is fine


def test_shards_checked_before_training(tmp_path):
    from zoo.data.writer import write_shards

    write_shards(generate("scenes", 4, size=48), tmp_path / "small", maxcount=4)
    with pytest.raises(ConfigError, match="48x48 px.*at least 64 px"):
        tiny().data_spec().prepare(str(tmp_path / "small" / "*.tar"), False)
    write_shards(generate("digits", 4, size=64), tmp_path / "digits", maxcount=4)
    pattern = str(tmp_path / "digits" / "*.tar")
    with pytest.raises(ConfigError, match="channel field 'thermal' is in none of the first samples") as e:
        tiny(channels=["image", "thermal"]).data_spec().prepare(pattern, True)
    assert "\n" not in str(e.value)
    assert tiny().data_spec().prepare(pattern, False) == pattern


def test_registered_with_its_cpu_recipe():
    entry = RECIPES.get("satmae")
    assert entry.factory is SatMAE and entry.meta["cpu_recipe"] == "satmae_vit_tiny_patch4_32_scenes"
