"""DiT backbones (zoo.models.dit): every registered DiT builds, trains, publishes and loads; official DiT
checkpoints convert to what DiT computes; diffusers folders and `hf-hub:` pipelines load offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.cli import main
from zoo.errors import CheckpointMismatchError, ConfigError
from zoo.factory import count_params
from zoo.convert import dit_model
from zoo.models.dit import DIT_ARCHS, arch_for_config
from zoo.models.vit import sincos_pos_embed_2d
from zoo.registry import MODELS

def _dits() -> list[str]:
    return [n for n in zoo.list_models() if MODELS.get(n).meta.get("modality") == "diffusion"]


def _small_enough(name: str) -> dict[str, int]:
    """The paper's sizes are tested with 2 blocks on an 8x8 grid: the same layers, seconds instead of minutes."""
    return {"num_layers": 2, "sample_size": 8} if count_params(name) > 20_000_000 else {}


def _inputs(model, batch: int = 2):
    c, h, w = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, c, h, w, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, model.num_classes + 1, (batch,), generator=g))


def _perturb(model, scale: float = 0.05):
    """adaLN-zero initialises every block and the output to zero; random weights everywhere instead."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_dits_are_registered_as_diffusion_models_at_both_scales():
    names = set(zoo.list_models("dit_*"))
    assert {"dit_nano_patch2_8", "dit_tiny_patch2_8", "dit_small_patch2_256", "dit_base_patch2_256",
            "dit_xlarge_patch2_256"} <= names
    # the paper's sizes (diffusers gives each block its own timestep/label embedder, so counts exceed DiT's)
    assert 33e6 < count_params("dit_small_patch2_256") < 41e6
    assert 675e6 < count_params("dit_xlarge_patch2_256") < 760e6
    small, large = (count_params(n) for n in ("dit_nano_patch2_8", "dit_tiny_patch2_8"))
    assert large > 8 * small


@pytest.mark.parametrize("name", _dits())
def test_dit_forward_backward_publish_load(name):
    model = _perturb(zoo.create_model(name, **_small_enough(name)))
    x, t, y = _inputs(model)
    out = model(x, timestep=t, class_labels=y).sample
    c = model.pretrained_cfg["input_size"][0]
    assert out.shape == (2, model.config.out_channels, *x.shape[2:])
    assert model.config.out_channels == (2 * c if DIT_ARCHS[name]["out"] != c else c)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    zoo.publish(model, f"{name}.test", {"recipe": "none", "steps": 0})
    loaded = zoo.load(f"{name}.test")
    assert not loaded.training and loaded.zoo_card["arch"] == name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=y).sample, loaded(x, timestep=t, class_labels=y).sample)
    assert loaded.pretrained_cfg == model.pretrained_cfg


def test_zoo_dit_never_drops_labels_itself():
    """diffusers' label embedder drops labels in training mode, in every block separately; zoo's recipe
    drops them once per sample, so the model must not."""
    model = _perturb(zoo.create_model("dit_nano_patch2_8")).train()
    x, t, y = _inputs(model, batch=16)
    y = y.clamp(max=9)
    a = model(x, timestep=t, class_labels=y).sample
    b = model(x, timestep=t, class_labels=y).sample
    assert torch.equal(a, b)
    assert model.null_class == 10 and model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11


def test_arch_for_config_matches_structure_and_refuses_unknown():
    cfg = {"num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28, "patch_size": 2, "in_channels": 4,
           "out_channels": 8, "sample_size": 64, "num_embeds_ada_norm": 1000}
    assert arch_for_config(cfg) == ("dit_xlarge_patch2_256", {"sample_size": 64})
    with pytest.raises(ConfigError, match="no zoo DiT architecture has num_attention_heads=5"):
        arch_for_config({**cfg, "num_attention_heads": 5})


# -- official DiT checkpoints -----------------------------------------------------------------------------
WIDTH, DEPTH, HEADS, PATCH, SIZE, CH, CLASSES = 64, 4, 2, 2, 8, 4, 10  # dit_nano_patch2_8's structure


def official_dit_state_dict(seed: int, width: int = WIDTH, depth: int = DEPTH, patch: int = PATCH, size: int = SIZE,
                            classes: int = CLASSES, ch: int = CH) -> dict[str, torch.Tensor]:
    """Random weights under facebookresearch/DiT models.py names (learned sigma: 2C outputs)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    d, side, out = width, size // patch, patch * patch * 2 * ch
    sd = {"x_embedder.proj.weight": r(d, ch, patch, patch), "x_embedder.proj.bias": r(d),
          "pos_embed": sincos_pos_embed_2d(d, side, side, num_prefix=0).reshape(1, side * side, d),
          "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
          "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
          "y_embedder.embedding_table.weight": r(classes + 1, d),
          "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d),
          "final_layer.linear.weight": r(out, d), "final_layer.linear.bias": r(out)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d),
                   b + "attn.proj.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d),
                   b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d),
                   b + "adaLN_modulation.1.weight": r(6 * d, d), b + "adaLN_modulation.1.bias": r(6 * d)})
    return sd


def _official_forward(sd, x, t, y):
    """DiT's forward (models.py), written from the paper's code: the reference the conversion must match."""
    d, p = WIDTH, PATCH
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    for i in range(DEPTH):
        b = f"blocks.{i}."
        mods = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, 1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        hn = modulate(F.layer_norm(h, (d,), eps=1e-6), shift_msa, scale_msa)
        qkv = F.linear(hn, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(len(x), -1, 3, HEADS, d // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(len(x), -1, d)
        h = h + gate_msa[:, None] * F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        hn = modulate(F.layer_norm(h, (d,), eps=1e-6), shift_mlp, scale_mlp)
        m = F.gelu(F.linear(hn, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + gate_mlp[:, None] * F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    h = F.linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale), sd["final_layer.linear.weight"],
                 sd["final_layer.linear.bias"])
    side = SIZE // p
    h = h.reshape(len(x), side, side, p, p, 2 * CH)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(len(x), 2 * CH, SIZE, SIZE)


def _io():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, CH, SIZE, SIZE, generator=g), torch.tensor([0, 437, 999]), torch.tensor([2, 9, CLASSES])


def test_official_dit_checkpoint_converts_to_what_dit_computes():
    sd = official_dit_state_dict(0)
    model = dit_model(sd, arch="dit_nano_patch2_8").eval()
    x, t, y = _io()
    with torch.no_grad():
        ours = model(x, timestep=t, class_labels=y).sample
    ref = _official_forward(sd, x, t, y)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    # diffusers' own timestep frequencies (freq_shift=1, its default) are NOT DiT's: the reason freq_shift exists
    shifted = zoo.create_model("dit_nano_patch2_8", **model.zoo_args | {"freq_shift": 1})
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(shifted.eval()(x, timestep=t, class_labels=y).sample, ref, atol=1e-4)


def test_training_checkpoint_loads_its_ema_weights_by_file_and_by_convert(tmp_path):
    ema, raw = official_dit_state_dict(0), official_dit_state_dict(1)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": {"model": "DiT-S/2"}}, path)
    x, t, y = _io()
    loaded = zoo.load(path, arch="dit_nano_patch2_8")  # a pickle of tensors only: weights_only is enough
    with torch.no_grad():
        assert torch.allclose(loaded(x, timestep=t, class_labels=y).sample, _official_forward(ema, x, t, y), atol=1e-5)
    assert main(["convert", str(path), "dit_nano_patch2_8.converted", "--from", "dit", "--arch",
                 "dit_nano_patch2_8"]) == 0
    again = zoo.load("dit_nano_patch2_8.converted")
    assert again.zoo_card["provenance"]["method"] == "dit" and again.zoo_card["args"]["freq_shift"] == 0
    with torch.no_grad():
        assert torch.equal(again(x, timestep=t, class_labels=y).sample, loaded(x, timestep=t, class_labels=y).sample)


def test_official_checkpoint_errors_are_one_line():
    with pytest.raises(CheckpointMismatchError, match="not an official DiT checkpoint"):
        dit_model({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ConfigError, match="head count is not in the tensors; pass --arch"):
        dit_model(official_dit_state_dict(0))  # width 64 is no DiT size
    bad = official_dit_state_dict(0)
    bad["pos_embed"] = bad["pos_embed"] + 1
    with pytest.raises(CheckpointMismatchError, match="pos_embed is not the fixed"):
        dit_model(bad, arch="dit_nano_patch2_8")


# -- diffusers folders and the Hub, offline -------------------------------------------------------------
def _fake_dit_pipeline_cache(root, repo: str = "facebook/DiT-XL-2-256"):
    """A Hugging Face cache holding a DiT pipeline laid out as facebook/DiT-XL-2-256 is (model_index.json, a
    legacy `Transformer2DModel` config under transformer/, vae/), with a tiny transformer."""
    from diffusers import AutoencoderKL

    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("0" * 40)
    model = _perturb(zoo.create_model("dit_nano_patch2_8", in_channels=4, out_channels=8, sample_size=8,
                                      num_embeds_ada_norm=1000))
    model.save_pretrained(snap / "transformer")
    cfg = json.loads((snap / "transformer" / "config.json").read_text())
    cfg.update({"_class_name": "Transformer2DModel", "cross_attention_dim": None, "num_vector_embeds": None})
    (snap / "transformer" / "config.json").write_text(json.dumps(cfg))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8).save_pretrained(snap / "vae")
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                       "transformer": ["diffusers", "Transformer2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return model.eval(), snap


def test_hf_hub_dit_pipeline_loads_offline_through_diffusers(tmp_path):
    import huggingface_hub.constants as hf_constants

    from zoo.hub import load_vae

    original, snap = _fake_dit_pipeline_cache(__import__("pathlib").Path(hf_constants.HF_HUB_CACHE))
    model = zoo.load("hf-hub:facebook/DiT-XL-2-256")
    assert model.zoo_arch == "dit_nano_patch2_8" and model.zoo_source == "hf-hub:facebook/DiT-XL-2-256"
    assert model.pretrained_cfg["latent"]["vae"] == "facebook/DiT-XL-2-256:vae"
    x, t, y = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=y).sample, original(x, timestep=t, class_labels=y).sample)
    assert type(load_vae(model.pretrained_cfg["latent"]["vae"])).__name__ == "AutoencoderKL"
    assert zoo.load(snap).zoo_arch == "dit_nano_patch2_8"  # the same pipeline as a local folder
    zoo.publish(model, "dit_nano_patch2_8.hub")  # and into the zoo store, keeping its VAE
    assert zoo.load("dit_nano_patch2_8.hub").pretrained_cfg["latent"]["vae"] == "facebook/DiT-XL-2-256:vae"


def test_diffusers_reads_a_published_zoo_dit_folder():
    from diffusers import DiTTransformer2DModel

    model = _perturb(zoo.create_model("dit_nano_patch2_8"))
    path = zoo.publish(model, "dit_nano_patch2_8.for_diffusers")
    theirs = DiTTransformer2DModel.from_pretrained(path).eval()
    x, t, y = _inputs(model.eval())
    with torch.no_grad():
        assert torch.equal(theirs(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample)
    # a converted DiT computes DiT's timestep frequencies, which diffusers' class cannot: no diffusers files
    converted = dit_model(official_dit_state_dict(0), arch="dit_nano_patch2_8")
    folder = zoo.publish(converted, "dit_nano_patch2_8.converted_only_zoo")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert "_class_name" not in json.loads((folder / "config.json").read_text())
