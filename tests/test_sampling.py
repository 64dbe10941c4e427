"""T-Stitch and the sampler (zoo.eval.sampling): r = 0 is the large model's sampler and r = 1 the small one's,
bit for bit; the switch lands where DiT's rule says for every scheduler; a stitched DiTPipeline runs; bad
stitches fail before sampling; `zoo sample` writes a grid and its timing."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.errors import ConfigError
from zoo.eval.sampling import (
    SCHEDULERS,
    TStitch,
    forward_flops,
    generate,
    make_scheduler,
    parse_stitch,
    sample,
    sampling_flops,
)

SCHEDULER_NAMES = ["ddpm", "ddim", "dpm++", "euler", "euler-a", "pndm", "heun", "unipc"]


def _dit(arch: str, seed: int, **kwargs):
    """A zoo DiT with random weights everywhere (adaLN-zero would make every output zero)."""
    model = zoo.create_model(arch, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    return _dit("dit_nano_patch2_8", 1), _dit("dit_tiny_patch2_8", 2)


def _run(model, scheduler: str, steps: int = 8, guidance: float = 1.5, seed: int = 0):
    return sample(model, make_scheduler(scheduler), [0, 3, 7, 9], steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), progress=False)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++", "euler-a"])
def test_fraction_zero_is_the_large_model_and_one_the_small_bit_for_bit(pair, scheduler):
    small, large = pair
    alone_large, alone_small = _run(large, scheduler), _run(small, scheduler)
    assert not torch.equal(alone_large.images, alone_small.images)
    at0 = _run(TStitch(small, large, fraction=0.0), scheduler)
    at1 = _run(TStitch(small, large, fraction=1.0), scheduler)
    assert torch.equal(at0.images, alone_large.images) and set(at0.trace) == {1}
    assert torch.equal(at1.images, alone_small.images) and set(at1.trace) == {0}
    between = _run(TStitch(small, large, fraction=0.5), scheduler)
    assert not torch.equal(between.images, alone_large.images) and not torch.equal(between.images, alone_small.images)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("r", [0.3, 0.5])
def test_switch_happens_where_dits_rule_says(pair, scheduler, r):
    """DiT's rule (dit/models.py TStitch): the small model iff t/1000 >= 1 - r, whatever the spacing."""
    small, large = pair
    result = _run(TStitch(small, large, fraction=r), scheduler, steps=10, guidance=1.0)
    expected = make_scheduler(scheduler)
    expected.set_timesteps(10)
    want = [0 if float(t) / 1000 >= 1 - r else 1 for t in expected.timesteps]
    assert result.trace == want, (scheduler, [float(t) for t in expected.timesteps])
    assert want[0] == 0 and want[-1] == 1 and want == sorted(want)  # one switch, small first


def test_three_models_follow_the_cumulative_fractions(pair):
    small, large = pair
    mid = _dit("dit_nano_patch2_8", 3, num_layers=2)
    stitched = TStitch(small, mid, large, fractions=[0.4, 0.2, 0.4])
    result = _run(stitched, "ddim", steps=10, guidance=1.0)
    assert stitched.trace_string() == "0000112222" == "".join(map(str, result.trace))  # t = 900 .. 0


def test_guidance_scale_is_passed_through(pair):
    small, large = pair
    stitched = TStitch(small, large, fraction=0.4)
    a, b = _run(stitched, "ddim", guidance=1.5), _run(stitched, "ddim", guidance=4.0)
    assert not torch.equal(a.images, b.images)
    assert sampling_flops(stitched, a.trace, 1.5) == 2 * sampling_flops(stitched, a.trace, 1.0)


def test_flops_follow_the_trace(pair):
    small, large = pair
    fs, fl = forward_flops(small), forward_flops(large)
    assert fl > 8 * fs > 0
    stitched = TStitch(small, large, fraction=0.4)
    result = _run(stitched, "ddim", steps=10, guidance=1.0)
    assert result.trace.count(0) == 4 and sampling_flops(stitched, result.trace) == 4 * fs + 6 * fl


def test_a_stitched_dit_pipeline_runs_and_equals_the_large_one_at_zero():
    """TStitch as the `transformer` of a stock diffusers DiTPipeline (latent DiTs with 1000 classes, a tiny VAE)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    latent = dict(in_channels=4, out_channels=8, sample_size=8, num_embeds_ada_norm=1000)
    small, large = _dit("dit_nano_patch2_8", 1, num_layers=2, **latent), _dit("dit_nano_patch2_8", 2, **latent)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8).eval()

    def run(transformer):
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(class_labels=[1, 2], num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    stitched = TStitch(small, large, fraction=0.5)
    images = run(stitched)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert stitched.trace_string() == "SSLLLL"  # DDIM 6 steps: t = 830, 664 | 498, 332, 166, 0
    assert torch.equal(run(TStitch(small, large, fraction=0.0)), run(large))


# -- bad input: one line, before any sampling ------------------------------------------------------------------
@pytest.mark.parametrize("other,match", [
    (dict(sample_size=4), r"latent shape \(1, 4, 4\) vs \(1, 8, 8\)"),
    (dict(in_channels=3, out_channels=3), r"latent shape \(3, 8, 8\)"),
    (dict(num_embeds_ada_norm=12), r"conditioning \('class', 12\) vs \('class', 10\)"),
])
def test_models_that_cannot_share_a_trajectory_are_refused(pair, other, match):
    _, large = pair
    with pytest.raises(ConfigError, match=match):
        TStitch(_dit("dit_nano_patch2_8", 1, **other), large, fraction=0.4)


def test_another_noise_schedule_is_refused(pair):
    small, large = pair
    small.zoo_card = {"diffusion": {"schedule": {"beta_schedule": "squaredcos_cap_v2"}}}
    try:
        with pytest.raises(ConfigError, match="noise schedule"):
            TStitch(small, large, fraction=0.4)
    finally:
        del small.zoo_card


@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction=1.2), r"fractions must lie in \[0, 1\]"),
    (dict(fraction=-0.1), r"fractions must lie in \[0, 1\]"),
    (dict(fractions=[0.5, 0.6]), "fractions must sum to 1"),
    (dict(fractions=[1.0]), "1 fractions for 2 models"),
    (dict(), "give fraction=r"),
])
def test_bad_fractions_are_refused(pair, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        TStitch(*pair, **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_scheduler_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown scheduler 'dddim'; did you mean 'ddim'\? Valid: ddpm, ddim") as err:
        make_scheduler("dddim")
    assert all(name in str(err.value) for name in SCHEDULERS)


def test_parse_stitch():
    assert parse_stitch("dit_nano_patch2_8.digits@0.4") == ("dit_nano_patch2_8.digits", 0.4)
    for bad in ("dit_nano_patch2_8.digits", "x@y", "@0.3"):
        with pytest.raises(ConfigError, match="MODEL@FRACTION"):
            parse_stitch(bad)


# -- by name: zoo.eval.sampling.generate and `zoo sample` -----------------------------------------------------
def test_generate_and_the_cli_write_a_grid_and_timing(pair, tmp_path, capsys):
    small, large = pair
    zoo.publish(small, "dit_nano_patch2_8.t", {"recipe": "none"})
    zoo.publish(large, "dit_tiny_patch2_8.t", {"recipe": "none"})
    result = generate("dit_tiny_patch2_8.t", stitch=[("dit_nano_patch2_8.t", 0.4)], steps=10, n=6, seed=1,
                      guidance_scale=1.5, progress=False)
    assert result.images.shape == (6, 1, 8, 8) and result.labels == [0, 1, 2, 3, 4, 5]
    assert result.trace == [0] * 4 + [1] * 6
    assert result.flops == 2 * (4 * forward_flops(small) + 6 * forward_flops(large))
    with pytest.raises(ConfigError, match=r"labels \[12\] are outside the model's classes 0..9"):
        generate("dit_tiny_patch2_8.t", labels=[1, 12], steps=2, progress=False)
    with pytest.raises(ConfigError, match="fractions must lie in"):
        generate("dit_tiny_patch2_8.t", stitch=[("dit_nano_patch2_8.t", 1.5)], steps=2, progress=False)

    out = tmp_path / "grid.png"
    assert main(["sample", "dit_tiny_patch2_8.t", "--stitch", "dit_nano_patch2_8.t@0.4", "--scheduler", "ddim",
                 "--steps", "10", "--n", "6", "--seed", "1", "--guidance", "1.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    info = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and info["trace"] == "SSSSLLLLLL" and info["n"] == 6 and info["seconds"] > 0
    assert info["gflops_per_image"] == round(result.flops / 1e9, 4)
    assert "SSSSLLLLLL" in printed and "ms/image" in printed


def test_schedulers_sample_as_dit_does_without_clipping_unless_asked():
    """DiT samples with clip_denoised=False; diffusers' DDIM/DDPM clip x0 by default (and keep the unclipped ε)."""
    for name in ("ddim", "ddpm"):
        assert make_scheduler(name).config.clip_sample is False
        assert make_scheduler(name, clip_sample=True).config.clip_sample is True
    assert make_scheduler("dpm++", {"beta_end": 0.012}).config.beta_end == 0.012
