"""Folders both ways: timm and open_clip read what zoo publishes, zoo reads what timm saves.

Every check runs the real libraries (timm's `local-dir:`/`hf-hub:` loaders, open_clip's factory) on
tiny random models, offline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

import zoo
import zoo.hub
from zoo.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy CPU (conftest resets it per test)."""
    torch.set_num_threads(1)


def randomize_norms(model: nn.Module) -> nn.Module:
    """LayerNorms off their (1, 0) init, so a norm dropped or swapped shows in the outputs."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def images(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def hf_snapshot(repo_id: str, folder: Path, names: list[str]) -> None:
    """Files of a folder as a Hugging Face cache snapshot of `repo_id` (conftest's offline, per-test cache)."""
    import huggingface_hub.constants as hf_constants

    repo = Path(hf_constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in names:
        shutil.copyfile(folder / name, repo / "snapshots" / commit / name)


# -- 1. timm reads zoo folders -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg", "num_classes": 5, "init_values": 0.1}],
                         ids=["token", "avg-head-layerscale"])
def test_timm_builds_published_vit_with_same_outputs_and_preprocessing(tmp_path, kwargs):
    torch.manual_seed(0)
    model = randomize_norms(zoo.create_model("vit_nano_patch4_32", mean=(0.5, 0.4, 0.3), **kwargs)).eval()
    folder = zoo.publish(model, "vit_nano_patch4_32.interop", root=tmp_path)
    card = json.loads((folder / "config.json").read_text())
    assert card["arch"] == "vit_nano_patch4_32" and card["architecture"] in timm.list_models()
    assert card["num_classes"] == model.num_classes and card["model_args"]["embed_dim"] == 128

    twin = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert isinstance(twin, timm.models.VisionTransformer)
    with torch.no_grad():
        for x in (images(32), images(40)):  # 40 px: both resample the position embedding alike
            assert torch.allclose(twin.forward_features(x), model.forward_features(x), atol=1e-5)
            assert torch.allclose(twin(x), model(x), atol=1e-5)
        x = images(32)
        pooled = twin.forward_head(twin.forward_features(x), pre_logits=True)
        assert torch.allclose(pooled, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)
        # the weights were read, not left at timm's init
        fresh = timm.create_model(f"local-dir:{folder}", pretrained=False).eval()
        assert not torch.allclose(fresh.forward_features(x), model.forward_features(x), atol=1e-3)

    data = timm.data.resolve_data_config({}, model=twin)
    zc = model.pretrained_cfg
    assert tuple(data["input_size"]) == tuple(zc["input_size"]) == (3, 32, 32)
    assert tuple(data["mean"]) == pytest.approx((0.5, 0.4, 0.3)) and tuple(data["std"]) == pytest.approx(zc["std"])
    assert data["crop_pct"] == zc["crop_pct"] and data["interpolation"] == zc["interpolation"]

    # timm's own head swap works from the card (first_conv / classifier)
    ten = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=7).eval()
    assert ten(images(32)).shape == (2, 7)
    # and zoo still reads its own folder as a zoo ViT
    again = zoo.load(folder)
    assert isinstance(again, zoo.models.vit.VisionTransformer)
    assert torch.equal(again(images(32)), model(images(32)))


def test_timm_reads_published_vit_from_hf_hub_cache(tmp_path):
    """The same folder pushed to the Hub: timm's hf-hub: loader finds config.json and model.safetensors."""
    model = randomize_norms(zoo.create_model("vit_nano_patch4_32")).eval()
    folder = zoo.publish(model, "vit_nano_patch4_32.hub", root=tmp_path)
    hf_snapshot("zoo-test/vit-nano", folder, ["config.json", "model.safetensors"])
    twin = timm.create_model("hf-hub:zoo-test/vit-nano", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(twin(images(32)), model(images(32)), atol=1e-5)
    assert zoo.load("hf-hub:zoo-test/vit-nano").zoo_card["arch"] == "vit_nano_patch4_32"  # zoo still reads it as its own


def test_timm_builds_published_resnet(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("resnet18").eval()
    folder = zoo.publish(model, "resnet18.interop", root=tmp_path)
    twin = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = images(32, n=1)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    assert twin.num_classes == 0
    assert timm.data.resolve_data_config({}, model=twin)["mean"] == pytest.approx(model.pretrained_cfg["mean"])


def test_timm_architecture_is_the_zoo_name_where_timm_has_it():
    card = zoo.hub.make_card(zoo.create_model("vit_tiny_patch16_224", depth=1), "vit_tiny_patch16_224.x")
    assert card["architecture"] == "vit_tiny_patch16_224" and card["model_args"]["depth"] == 1
    assert zoo.hub.make_card(zoo.create_model("vit_nano_patch4_32"), "x")["architecture"] == "vit_base_patch16_224"


def test_clip_folders_carry_no_timm_fields(tmp_path):
    """open_clip's image tower has no timm twin with the same keys: its card stays zoo-only."""
    card = zoo.hub.make_card(zoo.create_model("clip_vit_nano_patch4_32"), "clip_vit_nano_patch4_32.x")
    assert card["arch"] == "clip_vit_nano_patch4_32"
    assert not {"architecture", "model_args"} & set(card)


# -- 2. zoo reads timm folders --------------------------------------------------------------------
@pytest.fixture
def timm_folder(tmp_path):
    """A tiny timm ViT with a 3-way head, saved by timm's save_for_hf as safetensors."""
    torch.manual_seed(0)
    twin = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                             num_classes=3)
    twin = randomize_norms(twin).eval()
    folder = tmp_path / "timm_vit"
    timm.models.save_for_hf(twin, folder, safe_serialization=True)
    return folder, twin


def test_zoo_loads_timm_folder_through_timm(timm_folder):
    folder, twin = timm_folder
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    model = zoo.load(folder)
    assert isinstance(model, timm.models.VisionTransformer) and not model.training
    x = images(32)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x)) and model(x).shape == (2, 3)
    assert model.pretrained_cfg["mean"] == pytest.approx(twin.pretrained_cfg["mean"])
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert model.zoo_card["arch"] == "timm:vit_tiny_patch16_224" and model.zoo_source == str(folder)
    # keyword arguments reach timm, as for timm:NAME
    assert zoo.load(str(folder), num_classes=0)(x).shape == (2, 192)


def test_broken_timm_folder_errors_say_what_to_do(timm_folder):
    from zoo.errors import CheckpointMismatchError

    folder, _ = timm_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_args": {**cfg["model_args"], "depth": 3}}))
    with pytest.raises(CheckpointMismatchError, match="strict=False"):
        zoo.load(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "architecture": "vit_from_the_future"}))
    with pytest.raises(ConfigError, match="upgrade timm"):
        zoo.load(folder)


def test_zoo_loads_timm_pickle_folder(tmp_path):
    """timm's default save_for_hf writes pytorch_model.bin; timm reads it with weights_only=True."""
    torch.manual_seed(1)
    twin = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    folder = tmp_path / "timm_resnet"
    timm.models.save_for_hf(twin, folder)
    assert (folder / "pytorch_model.bin").is_file()
    x = images(32)
    with torch.no_grad():
        assert torch.equal(zoo.load(folder)(x), twin(x))


def test_timm_folder_into_a_zoo_architecture_with_arch(timm_folder):
    """`arch=` loads the weights of a timm folder (or its model.safetensors) into zoo's own ViT."""
    folder, twin = timm_folder
    shape = dict(img_size=32, patch_size=4, depth=2, num_classes=3)
    x = images(32)
    for source in (folder, folder / "model.safetensors"):
        model = zoo.load(source, arch="vit_tiny_patch16_224", **shape)
        assert isinstance(model, zoo.models.vit.VisionTransformer)
        with torch.no_grad():
            assert torch.allclose(model(x), twin(x), atol=1e-5)
    # without arch= the bare file beside a timm config says what to do
    with pytest.raises(ConfigError, match="arch="):
        zoo.load(folder / "model.safetensors")


def test_weights_file_beside_foreign_config_uses_arch(tmp_path):
    """Any non-zoo config.json (here a transformers-style one) is ignored once arch= says what the file is."""
    torch.manual_seed(2)
    model = zoo.create_model("vit_nano_patch4_32").eval()
    f = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 128}))
    with pytest.raises(ConfigError, match="arch="):
        zoo.load(f)
    x = images(32)
    assert torch.equal(zoo.load(f, arch="vit_nano_patch4_32")(x), model(x))


# -- 3. open_clip reads zoo CLIP folders -------------------------------------------------------------
@pytest.fixture
def clip_folder(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(zoo.create_model("clip_nano_patch4_32")).eval()
    return zoo.publish(model, "clip_nano_patch4_32.interop", root=tmp_path), model


def _assert_same_clip(theirs, ours, tokens):
    x = images(32)
    with torch.no_grad():
        assert torch.allclose(theirs.encode_image(x), ours.encode_image(x), atol=1e-5)
        assert torch.allclose(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-5)
        assert torch.equal(theirs.logit_scale, ours.logit_scale)


def test_open_clip_builds_published_clip(clip_folder):
    import open_clip

    folder, model = clip_folder
    weights, oc_weights = folder / "model.safetensors", folder / "open_clip_model.safetensors"
    assert os.stat(weights).st_ino == os.stat(oc_weights).st_ino  # one file, two names
    oc_cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert oc_cfg["model_cfg"]["vision_cfg"]["width"] == 128

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs.eval()
    assert type(theirs) is open_clip.CLIP
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    tokens = tokenizer(["a photo of a cat", "a red square"])
    assert torch.equal(tokens, model.tokenizer(["a photo of a cat", "a red square"]))
    _assert_same_clip(theirs, model, tokens)
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == pytest.approx(model.pretrained_cfg["mean"])
    assert tuple(norm.std) == pytest.approx(model.pretrained_cfg["std"])
    assert theirs.visual.preprocess_cfg["size"] == (32, 32)
    # zoo reads the same folder as its own CLIP
    ours = zoo.load(folder)
    assert isinstance(ours.visual, zoo.models.clip.ClipImageTower)
    _assert_same_clip(ours, model, tokens)


def test_open_clip_reads_published_clip_from_hf_hub_cache(clip_folder):
    """open_clip's hf-hub: loader asks for open_clip_model.safetensors, the name publish links in."""
    import open_clip

    folder, model = clip_folder
    hf_snapshot("zoo-test/clip-nano", folder, ["open_clip_config.json", "open_clip_model.safetensors"])
    theirs = open_clip.create_model("hf-hub:zoo-test/clip-nano").eval()
    _assert_same_clip(theirs, model, model.tokenizer(["a cat"]))


def test_open_clip_builds_published_siglip_with_its_logit_bias(tmp_path):
    import open_clip

    model = zoo.create_model("clip_nano_patch4_32", init_logit_bias=-10.0).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    folder = zoo.publish(model, "clip_nano_patch4_32.sig", root=tmp_path)
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    assert float(theirs.logit_bias.detach()) == -7.5
    _assert_same_clip(theirs, model, model.tokenizer(["a cat"]))


def test_clip_image_tower_gets_no_open_clip_config(tmp_path):
    folder = zoo.publish(zoo.create_model("clip_vit_nano_patch4_32"), "clip_vit_nano_patch4_32.interop", root=tmp_path)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
