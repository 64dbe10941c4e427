"""CLIP recipe: caption policies (counted), the loss against open_clip's, the zoo CLIP archs,
bad configs, and a tiny end-to-end run: train, publish, reload, zero-shot."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.errors import ConfigError, SampleError
from zoo.recipes.base import DataSpec, Progress
from zoo.recipes.clip import CLIP, CaptionPolicy, CaptionSampler
from zoo.registry import MODELS, RECIPES

ARCH = "clip_nano_patch4_32"
DRAWS = 2000


def scene_sample(**captions) -> dict:
    """A decoded sample as the data spec's transform sees it: an image, `meta` captions as built-in scenes have them."""
    caps = captions or {"exact": "a large red circle at the top left, on a striped background",
                        "short": "a red circle", "noisy": "Red Circle Vector Icon"}
    return {"image": Image.new("RGB", (32, 32)), "meta": {"captions": caps}}


def sampler(policy: str, alt: str = "noisy", quality=("exact", "short")) -> CaptionSampler:
    return CaptionSampler(CaptionPolicy.parse(policy), alt, quality, zoo.models.clip.clip_tokenizer("ViT-nano-4-32"))


def counts(s: CaptionSampler, sample: dict, n: int = DRAWS) -> Counter:
    return Counter(tuple(s.choose(sample)) for _ in range(n))


@pytest.fixture(scope="module")
def method() -> CLIP:
    return CLIP(ARCH, captions="quality")


# -- caption policies, counted -----------------------------------------------------------------
def test_alt_gives_only_the_alt_caption():
    sample = scene_sample()
    assert counts(sampler("alt"), sample) == Counter({("Red Circle Vector Icon",): DRAWS})


def test_quality_is_uniform_over_the_quality_captions():
    sample = scene_sample()
    c = counts(sampler("quality"), sample)
    assert set(c) == {(sample["meta"]["captions"]["exact"],), ("a red circle",)}
    for n in c.values():
        assert abs(n / DRAWS - 0.5) < 0.05, c
    # a name holding a list (DataCompDR's synthetic captions) counts each entry: uniform over all four
    listed = scene_sample(exact="e", syn=["s1", "s2", "s3"], noisy="n")
    c = counts(sampler("quality", quality=("exact", "syn")), listed)
    assert set(c) == {("e",), ("s1",), ("s2",), ("s3",)}
    for n in c.values():
        assert abs(n / DRAWS - 0.25) < 0.04, c


def test_mix_replaces_alt_with_probability_p():
    sample = scene_sample()
    c = counts(sampler("mix:0.3"), sample)
    quality = c[("a red circle",)] + c[(sample["meta"]["captions"]["exact"],)]
    assert quality + c[("Red Circle Vector Icon",)] == DRAWS
    assert abs(quality / DRAWS - 0.3) < 0.04, c
    assert abs(c[("a red circle",)] / quality - 0.5) < 0.07, c  # the quality caption is drawn uniformly
    assert counts(sampler("mix:0"), sample) == Counter({("Red Circle Vector Icon",): DRAWS})
    assert sum(n for k, n in counts(sampler("mix:1"), sample).items() if k != ("Red Circle Vector Icon",)) == DRAWS
    # a sample without quality captions keeps its alt-text
    assert counts(sampler("mix:1"), scene_sample(noisy="n"), 50) == Counter({("n",): 50})


def test_both_gives_alt_and_a_quality_caption_every_sample():
    sample = scene_sample()
    c = counts(sampler("both"), sample)
    assert all(k[0] == "Red Circle Vector Icon" and k[1] in ("a red circle", sample["meta"]["captions"]["exact"])
               for k in c)
    assert abs(c[("Red Circle Vector Icon", "a red circle")] / DRAWS - 0.5) < 0.05, c


def test_real_shard_names_alt_is_the_txt_member():
    sample = {"image": torch.zeros(3, 32, 32), "caption": "alt text from the web",
              "meta": {"captions": {"syn": ["a dog on grass", "a brown dog"]}}}
    assert sampler("alt", alt="caption", quality=("syn",)).choose(sample) == ["alt text from the web"]
    assert set(counts(sampler("both", alt="caption", quality=("syn",)), sample, 200)) == {
        ("alt text from the web", "a dog on grass"), ("alt text from the web", "a brown dog")}


def test_missing_captions_are_sample_errors_that_say_what_the_sample_has():
    with pytest.raises(SampleError, match="noisy"):
        sampler("alt").choose(scene_sample(exact="e"))
    with pytest.raises(SampleError, match="exact"):
        sampler("quality").choose(scene_sample(noisy="n"))


def test_transform_crops_and_tokenizes_in_the_data_spec(method):
    spec = method.data_spec()
    assert isinstance(spec, DataSpec) and spec.transform is not None
    assert "meta" in spec.optional_fields
    flips = [op for op in spec.transform.image.transforms if "Flip" in type(op).__name__]
    assert not flips  # captions say left and right
    out = spec.transform(scene_sample())
    assert set(out) == {"image", "text"} and out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
    assert out["text"].dtype == torch.long and out["text"].shape == (32,)
    tok = method.model.tokenizer
    assert any(torch.equal(out["text"], tok([t])[0]) for t in scene_sample()["meta"]["captions"].values())
    both = CLIP(ARCH, captions="both").data_spec().transform(scene_sample())
    assert set(both) == {"image", "text", "text_quality"}
    assert torch.equal(both["text"], tok(["Red Circle Vector Icon"])[0])


def test_caption_stream_follows_the_loader_seed(tmp_path, method):
    """rng=None: the loader's per-worker seeding fixes every caption choice."""
    from zoo.data import loader, write_shards
    from zoo.data.builtin import generate

    write_shards(generate("scenes", 24, size=32), tmp_path / "s", maxcount=24)
    transform = CLIP(ARCH, captions="mix:0.5").data_spec().transform

    def texts(seed: int) -> torch.Tensor:
        data = loader(str(tmp_path / "s" / "00000.tar"), fields=("image",), optional_fields=("meta",), batch_size=8,
                      transform=transform, seed=seed, shuffle=0)
        return torch.cat([b["text"] for b in data])

    assert torch.equal(texts(1), texts(1))
    assert not torch.equal(texts(1), texts(2))


# -- the loss is open_clip's ------------------------------------------------------------------
def _batch(model, n: int = 6, both: bool = False) -> dict:
    torch.manual_seed(1)
    words = ["a red circle", "a blue square", "a green star", "a white ring", "a purple cross", "an orange triangle"]
    batch = {"image": torch.randn(n, 3, 32, 32), "text": model.tokenizer(words[:n])}
    if both:
        batch["text_quality"] = model.tokenizer([f"{w} on a striped background" for w in words[:n]])
    return batch


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_step_loss_equals_open_clip_loss(loss):
    from open_clip.loss import ClipLoss, SigLipLoss

    m = CLIP(ARCH, loss=loss)
    batch = _batch(m.model)
    out = m.training_step(batch, 0)
    img = F.normalize(m.model.encode_image(batch["image"]), dim=-1)
    txt = F.normalize(m.model.encode_text(batch["text"]), dim=-1)
    scale = m.model.logit_scale.exp()
    if loss == "clip":
        want = ClipLoss()(img, txt, scale)
        logits = scale * img @ txt.T  # by hand: symmetric cross-entropy, labels on the diagonal
        labels = torch.arange(len(img))
        by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        assert math.isclose(float(scale.detach()), 1 / 0.07, rel_tol=1e-5) and m.model.logit_bias is None
    else:
        bias = m.model.logit_bias
        want = SigLipLoss()(img, txt, scale, bias)
        logits = scale * img @ txt.T + bias
        signs = 2 * torch.eye(len(img)) - 1
        by_hand = -F.logsigmoid(signs * logits).sum() / len(img)
        assert math.isclose(float(scale.detach()), 10.0, rel_tol=1e-5) and float(bias.detach()) == -10.0
        assert float(out["logit_bias"]) == -10.0
    assert torch.allclose(out["loss"], want, atol=1e-5) and torch.allclose(want, by_hand, atol=1e-5)
    assert math.isclose(float(out["logit_scale"]), float(scale.detach()), rel_tol=1e-6)
    out["loss"].backward()
    assert m.model.logit_scale.grad is not None and m.model.visual.conv1.weight.grad is not None


def test_both_sums_the_alt_and_quality_losses():
    from open_clip.loss import ClipLoss

    m = CLIP(ARCH, captions="both")
    batch = _batch(m.model, both=True)
    out = m.training_step(batch, 0)
    img = m.model.encode_image(batch["image"], normalize=True)
    scale = m.model.logit_scale.exp()
    alt = ClipLoss()(img, m.model.encode_text(batch["text"], normalize=True), scale)
    quality = ClipLoss()(img, m.model.encode_text(batch["text_quality"], normalize=True), scale)
    assert torch.allclose(out["loss_alt"], alt, atol=1e-5) and torch.allclose(out["loss_quality"], quality, atol=1e-5)
    assert torch.allclose(out["loss"], alt + quality, atol=1e-5)


def test_logit_scale_is_clamped_after_each_step(method):
    with torch.no_grad():
        method.model.logit_scale.fill_(10.0)
    method.on_step_end(Progress(1, 10, 0, 5))
    assert math.isclose(float(method.model.logit_scale.detach().exp()), 100.0, rel_tol=1e-5)


def test_no_weight_decay_for_gains_biases_and_logit_scale():
    m = CLIP(ARCH, loss="siglip")
    names = {id(p): n for n, p in m.named_parameters()}
    groups = m.param_groups(weight_decay=0.2)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    assert {"model.logit_scale", "model.logit_bias", "model.visual.class_embedding", "model.ln_final.weight",
            "model.visual.ln_post.bias", "model.transformer.resblocks.0.attn.in_proj_bias"} <= no_decay
    assert {"model.visual.conv1.weight", "model.visual.proj", "model.token_embedding.weight",
            "model.visual.transformer.resblocks.0.attn.in_proj_weight"} <= decay
    assert len(no_decay) + len(decay) == len(names)


# -- archs and export ---------------------------------------------------------------------------
def test_registered():
    assert "clip" in RECIPES
    for arch in ("clip_vit_nano_patch4_32", "clip_nano_patch4_32", "clip_vit_base_patch16_224", "clip_base_patch16_224"):
        assert arch in MODELS
    assert MODELS.get("clip_nano_patch4_32").meta["modality"] == "image-text"
    assert zoo.models.clip.resolve_clip_arch("ViT-B-16").clip_arch == "clip_base_patch16_224"
    assert zoo.models.clip.resolve_clip_arch("clip_vit_nano_patch4_32").clip_arch == ARCH


def test_image_tower_is_open_clips_visual():
    """Same parameters (names and values) and the same embedding as open_clip's VisionTransformer."""
    import copy

    from zoo.models.clip import ClipImageTower, create_open_clip

    oc = create_open_clip("ViT-nano-4-32").eval()
    visual = copy.deepcopy(oc.visual)
    keys = list(oc.state_dict())
    oc.visual = ClipImageTower(oc.visual)
    assert list(oc.state_dict()) == keys  # the whole model's state dict stays open_clip's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(oc.visual(x), visual(x), atol=1e-6)
        assert torch.allclose(oc.encode_image(x), visual(x), atol=1e-6)
        maps = oc.visual.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    assert maps[0].shape == (2, 128, 8, 8)


def test_export_and_publish(method):
    exported = method.export("clip_vit_nano_patch4_32.t")
    assert list(exported) == ["clip_vit_nano_patch4_32.t", "clip_nano_patch4_32.t"]  # each under its own arch
    tower, whole = exported.values()
    assert tower.zoo_arch == "clip_vit_nano_patch4_32" and whole.zoo_arch == ARCH and method.backbone() is tower
    assert tower is whole.visual and tower.pretrained_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    for name, model in exported.items():
        zoo.publish(model, name, {"recipe": "clip"})
    x = torch.randn(2, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        assert torch.equal(zoo.load("clip_vit_nano_patch4_32.t")(x), method.model.encode_image(x))
        assert torch.equal(zoo.load("clip_nano_patch4_32.t").encode_image(x), method.model.encode_image(x))


def test_siglip_model_reloads_with_its_logit_bias():
    whole = CLIP(ARCH, loss="siglip").export("clip_vit_nano_patch4_32.sig")["clip_nano_patch4_32.sig"]
    with torch.no_grad():
        whole.logit_bias.fill_(-7.5)
    zoo.publish(whole, "clip_nano_patch4_32.sig", {"recipe": "clip"})
    loaded = zoo.load("clip_nano_patch4_32.sig")
    assert float(loaded.logit_bias.detach()) == -7.5 and loaded.zoo_card["args"]["init_logit_bias"] == -10.0


def test_cli_finds_the_tokenizer_of_a_zoo_clip_model(method):
    from zoo.cli import _tokenizer_for

    assert _tokenizer_for(method.model) is method.model.tokenizer


# -- bad configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("captions", ["alt_text", "mix", "mix:1.5", "mix:-0.1", "mix:abc", ""])
def test_bad_caption_policy_is_a_one_line_config_error(captions):
    with pytest.raises(ConfigError) as err:
        CLIP(ARCH, captions=captions)
    msg = str(err.value)
    assert "\n" not in msg and "alt, quality, mix:P, both" in msg


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="valid: clip, siglip"):
        CLIP(ARCH, loss="infonce")
    with pytest.raises(ConfigError, match="clip_nano_patch4_32"):
        CLIP("clip_nano_patch4", captions="alt")
    with pytest.raises(ConfigError, match="quality_captions"):
        CLIP(ARCH, captions="quality", quality_captions=())
    with pytest.raises(ConfigError, match="both alt_caption and one of quality_captions"):
        CLIP(ARCH, captions="both", alt_caption="exact")


def test_bad_recipe_fails_before_training(tmp_path):
    from zoo.engine.trainer import pretrain

    r = recipe("unused.tar", steps=1)
    r["method"]["captions"] = "mix:2"
    with pytest.raises(ConfigError, match=r"mix:P"):
        pretrain(r, run_dir=tmp_path / "run")
    r["method"]["captions"], r["method"]["loss"] = "alt", "sigmoid"
    with pytest.raises(ConfigError, match="siglip"):
        pretrain(r, run_dir=tmp_path / "run2", overwrite=True)


# -- end to end --------------------------------------------------------------------------------
def recipe(data: str, steps: int, publish: str | None = None) -> dict:
    return {
        "method": {"name": "clip", "loss": "clip", "captions": "quality"},
        "model": {"arch": ARCH},
        "data": {"train": data, "batch_size": 32, "num_workers": 0, "shuffle": 200},
        "optim": {"lr": 2e-3, "weight_decay": 0.1, "betas": [0.9, 0.98]},
        "schedule": {"steps": steps, "warmup_steps": 5},
        "output": {"checkpoint_every": 1000, "log_every": 1, "publish": publish},
        "seed": 0,
    }


def colour_labelled_scenes(folder, n: int) -> str:
    """Scenes val shards whose label is the colour of the largest object (the shape label needs far
    longer training at 32 px; colour is what a few steps of captions teach first)."""
    from zoo.data import write_shards
    from zoo.data.builtin import generate, scenes

    colours = list(scenes.COLORS)
    samples = ({**s, "label": colours.index(s["meta"]["objects"][0]["color"])} for s in generate("scenes", n, split="val"))
    write_shards(samples, folder, maxcount=n)
    return str(folder / "00000.tar")


@pytest.mark.slow
def test_trains_publishes_and_zero_shots(tmp_path):
    from zoo.data import write_shards
    from zoo.data.builtin import generate, scenes
    from zoo.engine.checkpoint import latest_checkpoint, load_checkpoint
    from zoo.engine.trainer import pretrain
    from zoo.eval.zeroshot import zero_shot_eval

    write_shards(generate("scenes", 512, size=32), tmp_path / "train", maxcount=256)
    res = pretrain(recipe(str(tmp_path / "train" / "{00000..00001}.tar"), steps=40, publish="clip_vit_nano_patch4_32.e2e"),
                   run_dir=tmp_path / "run")
    losses = [m["loss"] for m in res.metrics]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
    assert set(res.published) == {"clip_vit_nano_patch4_32.e2e", "clip_nano_patch4_32.e2e"}

    # the published tower gives the embedding the trained model computes
    trained = CLIP(ARCH, captions="quality")
    trained.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path / "run"))["model"])
    tower = zoo.load("clip_vit_nano_patch4_32.e2e")
    x = torch.randn(4, 3, 32, 32)
    trained.eval()
    with torch.no_grad():
        assert torch.allclose(tower(x), trained.model.encode_image(x), atol=1e-6)

    whole = zoo.load("clip_nano_patch4_32.e2e")
    val = colour_labelled_scenes(tmp_path / "val", 300)
    colours = list(scenes.COLORS)
    zs = zero_shot_eval(whole, whole.tokenizer, val, colours, ("a {} shape",), batch_size=100)
    chance = 100 / len(colours)
    assert zs["top1"] > 2 * chance, zs
