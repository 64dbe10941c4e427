"""The diffusion recipe (recipes/diffusion.py): DDPM's noise-prediction loss, classifier-free-guidance label
dropout, EMA weights published with the noise schedule; its bad inputs. (Training, resume and publishing by
name are in the registry-wide test/test_recipes.py.)"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from zoo.config import load_config
from zoo.engine.contract import Progress
from zoo.errors import ConfigError
from zoo.recipes.diffusion import Diffusion, diffusion_loss, drop_labels


class Constant(torch.nn.Module):
    """A 'model' predicting a fixed ε: the loss must be the plain mean squared error against the noise."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, timestep, class_labels):
        self.seen = (x, timestep, class_labels)
        return type("Out", (), {"sample": torch.full((len(x), 2 * x.shape[1], *x.shape[2:]), self.value)})()


def test_loss_is_the_mse_of_epsilon_at_the_noised_input():
    schedule = DDPMScheduler()
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    model = Constant(0.25)
    loss = diffusion_loss(model, schedule, x0, torch.arange(4), t, noise)
    assert torch.allclose(loss, ((noise - 0.25) ** 2).mean())  # learned-sigma half ignored
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(model.seen[0], ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_label_dropout_replaces_by_the_null_class_at_the_rate():
    labels = torch.randint(0, 10, (20000,))
    dropped = drop_labels(labels, 0.1, 10, generator=torch.Generator().manual_seed(0))
    changed = dropped != labels
    assert (dropped[changed] == 10).all() and torch.equal(dropped[~changed], labels[~changed])
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_ema_is_what_gets_published_with_the_schedule():
    method = Diffusion("dit_nano_patch2_8", ema_momentum=0.9)
    x = {"image": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8)}
    out = method.training_step(x, 0)
    out["loss"].backward()
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.01)
    method.on_step_end(Progress(step=1000, total_steps=2000, epoch=0, steps_per_epoch=10))
    exported = method.export("dit_nano_patch2_8.x")["dit_nano_patch2_8.x"]
    assert exported.model is method.ema
    p_model, p_ema = (dict(m.named_parameters())["proj_out_2.weight"] for m in (method.model, method.ema))
    assert not torch.equal(p_model, p_ema) and not p_ema.requires_grad
    assert exported.card["diffusion"]["schedule"]["beta_schedule"] == "linear"
    assert exported.card["diffusion"]["weights"] == "ema"


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="is not a DiT architecture; use one of dit_"):
        Diffusion("vit_tiny_patch4_32")
    with pytest.raises(ConfigError, match="cfg_dropout is a probability"):
        Diffusion("dit_nano_patch2_8", cfg_dropout=1.5)
    transform = Diffusion("dit_nano_patch2_8").data_spec().transform
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    assert transform({"image": image, "label": 9})["image"].shape == (1, 8, 8)
    with pytest.raises(ConfigError, match=r"labels must lie in 0..9 for dit_nano_patch2_8, got 12"):
        transform({"image": image, "label": 12})
    with pytest.raises(ConfigError, match="noise schedule"):
        Diffusion("dit_nano_patch2_8", beta_schedule="no_such_schedule")


def test_both_cpu_recipes_and_the_paper_recipe_are_valid():
    small = load_config("diffusion_dit_nano_patch2_8_digits")
    large = load_config("diffusion_dit_tiny_patch2_8_digits")
    paper = load_config("diffusion_dit_xlarge_patch2_256")
    assert small.method.args == large.method.args  # one noise schedule: the pair can be stitched
    assert paper.method.args["latent_field"] == "latent" and paper.model.arch == "dit_xlarge_patch2_256"


def test_latent_training_reads_precomputed_latents_of_the_right_shape():
    import numpy as np

    method = Diffusion("dit_nano_patch2_8", latent_field="latent", in_channels=4, out_channels=8)
    spec = method.data_spec()
    assert spec.fields == ("latent", "label")
    sample = spec.transform({"latent": np.ones((4, 8, 8), dtype=np.float16), "label": 3})
    assert sample["latent"].dtype == torch.float32 and sample["latent"].shape == (4, 8, 8)
    out = method.training_step({"latent": torch.randn(2, 4, 8, 8), "label": torch.tensor([1, 2])}, 0)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match=r"holds arrays of shape \(4, 16, 16\); dit_nano_patch2_8 denoises \(4, 8, 8\)"):
        spec.transform({"latent": np.zeros((4, 16, 16)), "label": 0})
