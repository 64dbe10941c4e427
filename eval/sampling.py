"""Sampling class-conditional diffusion models, and T-Stitch: small-to-large trajectory stitching.

T-Stitch (Pan et al. 2024, arXiv:2402.14167, NVlabs/T-Stitch): K denoisers, small to large, that share the
data (or latent) space, noise schedule and conditioning run ONE ordinary sampling trajectory: one scheduler,
one x_t, handed over unchanged. The small model takes the first fraction r of the trajectory (the high-noise
end, which mostly shapes low-frequency global structure), the large one the rest. Training-free: cost
≈ steps · [r · C_small + (1 − r) · C_large], doubled with classifier-free guidance.

    stitched = TStitch(small, large, fraction=0.4)
    result = sample(stitched, make_scheduler("ddim"), labels, steps=50, guidance_scale=1.5)
    result.images, result.trace  # "SSSSSSSSSSSSSSSSSSSSLLLL..." : which model ran each step

The rule is DiT's (`dit/models.py::TStitch`), by timestep, so any diffusers scheduler works (multistep solvers
keep their history across the switch, as in the paper): with T training timesteps, progress = 1 − t/T, and a
step runs the first model whose cumulative fraction reaches it; for two models, the small one iff
t/T ≥ 1 − r. A `TStitch` is also a drop-in `transformer` for diffusers' `DiTPipeline`.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo.errors import ConfigError
from zoo.progress import progress_bar

# Scheduler names -> diffusers classes (extra arguments: those the class takes besides the noise schedule).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# DiT's training schedule (and diffusers' defaults): 1000 steps, linear betas 1e-4 -> 0.02, epsilon-prediction.
DEFAULT_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                                    "beta_end": 0.02, "prediction_type": "epsilon"}
# Sampler settings that are not the noise schedule: no clipping of the predicted x0, as DiT samples
# (`clip_denoised=False`); diffusers' DDIM/DDPM clip by default and, without recomputing ε from the clipped x0,
# lose most of their quality on our digits (Fréchet distance 0.53 vs 0.05 for the large CPU DiT, DDIM 50).
SAMPLER_DEFAULTS: dict[str, Any] = {"clip_sample": False}


def schedule_of(model: nn.Module) -> dict[str, Any]:
    """The noise schedule a model was trained with: its card's `diffusion.schedule`, else DiT's."""
    card = getattr(model, "zoo_card", None) or {}
    return {**DEFAULT_SCHEDULE, **((card.get("diffusion") or {}).get("schedule") or {})}


def make_scheduler(name: str, schedule: dict[str, Any] | None = None, **kwargs: Any):
    """A diffusers scheduler by name (`SCHEDULERS`) over a noise schedule (default DiT's), with DiT's sampling
    settings (`SAMPLER_DEFAULTS`: no x0 clipping); `kwargs` go to it (e.g. `timestep_spacing="trailing"`). An
    unknown name is a one-line error listing the valid ones."""
    import diffusers

    if name not in SCHEDULERS:
        from zoo.registry import close_matches

        hint = close_matches(name, list(SCHEDULERS), n=1)
        raise ConfigError(f"unknown scheduler {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                          + f" Valid: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    args = {**DEFAULT_SCHEDULE, **(schedule or {}), **SAMPLER_DEFAULTS, **extra, **kwargs}
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in args.items() if k in accepted})


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no diffusers config; stitch diffusers models (zoo DiTs)")
    return config


def _conditioning(model: nn.Module) -> tuple[str, int | None]:
    """(kind, class count) of a model's conditioning: DiT class labels, UNet class embeddings, or none."""
    config = _config_of(model)
    if getattr(config, "num_embeds_ada_norm", None):
        return "class", config.num_embeds_ada_norm
    if getattr(config, "num_class_embeds", None):
        return "class", config.num_class_embeds
    if getattr(config, "cross_attention_dim", None):
        return f"text({config.cross_attention_dim})", None
    return "none", None


class TStitch(nn.Module):
    """Several denoisers, small to large, as one: each call runs the model the trajectory's position picks.

    `TStitch(small, large, fraction=r)`: the small model for the first r of the trajectory. `TStitch(a, b, c,
    fractions=[0.4, 0.2, 0.4])`: any number of models, fractions in [0, 1] summing to 1. The models must share
    their input shape, channels, class count and conditioning, and (where their cards say) noise schedule:
    checked here, before any sampling (`names` label the models in those errors). `trace` records the index of
    the model each call ran.
    """

    def __init__(self, *models: nn.Module, fraction: float | None = None, fractions: Sequence[float] | None = None,
                 num_train_timesteps: int | None = None, names: Sequence[str] | None = None):
        super().__init__()
        if len(models) < 2:
            raise ConfigError(f"TStitch needs at least two models, small to large; got {len(models)}")
        if (fraction is None) == (fractions is None):
            raise ConfigError("TStitch: give fraction=r (two models) or fractions=[...] (one per model), not both")
        if fraction is not None:
            if len(models) != 2:
                raise ConfigError(f"TStitch: fraction= is for two models; give fractions=[...] for {len(models)}")
            fractions = [float(fraction), 1.0 - float(fraction)]
        fractions = [float(f) for f in fractions]
        if len(fractions) != len(models):
            raise ConfigError(f"TStitch: {len(fractions)} fractions for {len(models)} models; give one per model")
        if any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ConfigError(f"TStitch: fractions must lie in [0, 1], got {fractions}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"TStitch: fractions must sum to 1, got {fractions} (sum {sum(fractions):.4g})")
        check_stitchable(models, names)
        self.models = nn.ModuleList(models)
        self.fractions = fractions
        self.num_train_timesteps = int(num_train_timesteps or schedule_of(models[-1])["num_train_timesteps"])
        self.trace: list[int] = []

    # what diffusers pipelines read of their `transformer`
    @property
    def config(self) -> Any:
        return self.models[-1].config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.models[-1].parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.models[-1].parameters()).device

    def choose(self, timestep: float) -> int:
        """The model for a timestep: the first whose cumulative fraction reaches progress = 1 − t/T."""
        progress = 1.0 - float(timestep) / self.num_train_timesteps
        total = 0.0
        for i, f in enumerate(self.fractions):
            total += f
            if f > 0 and total >= progress - 1e-9:
                return i
        return len(self.fractions) - 1

    def forward(self, hidden_states: torch.Tensor, timestep: Any = None, class_labels: Any = None, **kwargs: Any):
        t = timestep.flatten()[0].item() if torch.is_tensor(timestep) else float(timestep)
        i = self.choose(t)
        self.trace.append(i)
        return self.models[i](hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)

    def trace_string(self, letters: str | None = None) -> str:
        """One letter a step: 'S'/'L' for two models (small, large), else the model's index."""
        letters = letters or ("SL" if len(self.models) == 2 else "0123456789")
        return "".join(letters[i] for i in self.trace)


def check_stitchable(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """One-line errors for models that cannot share a trajectory: another input shape or channel count,
    another class count or conditioning, another noise schedule (where their cards record one)."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]

    def describe(m: nn.Module) -> dict[str, Any]:
        c = _config_of(m)
        return {"latent shape": (c.in_channels, c.sample_size, c.sample_size),
                "output channels": getattr(c, "out_channels", None) or c.in_channels,
                "conditioning": _conditioning(m), "noise schedule": schedule_of(m)}

    ref = describe(models[-1])
    for name, m in zip(names, models):
        mine = describe(m)
        for key, value in mine.items():
            if value != ref[key]:
                raise ConfigError(f"cannot stitch {name} with {names[-1]}: {key} {value} vs {ref[key]}; the models "
                                  "of one trajectory must share latent space, conditioning and noise schedule")


def denoiser_models(model: nn.Module) -> list[nn.Module]:
    """The models a sampler may call (a TStitch's, or the model itself)."""
    return list(model.models) if isinstance(model, TStitch) else [model]


@dataclass
class SampleResult:
    """Images in [0, 1] (N, C, H, W), wall seconds, and the model index of every step (T-Stitch)."""

    images: torch.Tensor
    seconds: float
    trace: list[int] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    flops: int | None = None  # per sample, when measured (`generate`)
    labels: list[int] = field(default_factory=list)


def _null_class(model: nn.Module) -> int:
    kind, classes = _conditioning(denoiser_models(model)[-1])
    if kind != "class":
        raise ConfigError(f"classifier-free guidance needs a class-conditional model; this one's conditioning is {kind}")
    return classes


@torch.no_grad()
def sample(model: nn.Module, scheduler: Any, class_labels: Sequence[int] | torch.Tensor, *, steps: int = 50,
           guidance_scale: float = 1.0, generator: torch.Generator | None = None, vae: nn.Module | None = None,
           batch_size: int | None = None, progress: bool = True) -> SampleResult:
    """Class-conditional samples of a diffusers denoiser (a zoo DiT or a `TStitch`) with any diffusers scheduler.

    DiTPipeline's loop, without its pipeline: x_T ~ N(0, σ_init²); per step, the (CFG-doubled) input scaled by
    the scheduler, the model's ε (its first `in_channels` outputs; learned σ dropped), guidance on ε, the
    scheduler's step (given `generator` when it draws noise). Pixel models' outputs map from [-1, 1] to
    [0, 1]; latent ones are decoded by `vae` (SD's scaling). `batch_size` splits the labels; the batches
    draw from one generator in turn, so a seed gives the same noise whichever models a TStitch runs.
    `progress=False` hides the bar (it follows zoo's progress setting otherwise).
    """
    device = next(denoiser_models(model)[-1].parameters()).device
    dtype = next(denoiser_models(model)[-1].parameters()).dtype
    config = _config_of(model)
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if guidance_scale < 1.0:
        raise ConfigError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
    null = _null_class(model) if guidance_scale > 1 else None
    if isinstance(model, TStitch):
        model.trace.clear()
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    c, size = config.in_channels, config.sample_size
    outs: list[torch.Tensor] = []
    trace: list[int] = []
    timesteps: list[float] = []
    chunks = labels.split(batch_size or len(labels)) if len(labels) else []
    scheduler.set_timesteps(steps, device=device)
    start = time.perf_counter()
    bar = progress_bar(total=len(scheduler.timesteps) * len(chunks), desc="sampling", unit="step",
                       **({} if progress else {"disable": True}))
    for chunk in chunks:
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn((len(chunk), c, size, size), generator=generator, dtype=torch.float32).to(device, dtype)
        x = x * scheduler.init_noise_sigma
        y = chunk.to(device)
        y_in = torch.cat([y, torch.full_like(y, null)]) if null is not None else y
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if null is not None else x
            x_in = scheduler.scale_model_input(x_in, t)
            t_in = (t if torch.is_tensor(t) else torch.tensor(t)).to(device).expand(len(x_in))
            out = model(x_in, timestep=t_in, class_labels=y_in).sample
            eps = out[:, :c]
            if null is not None:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            kw = {"generator": generator} if accepts_generator and generator is not None else {}
            x = scheduler.step(eps, t, x, **kw).prev_sample
            bar.update(1)
        if chunk is chunks[0]:
            timesteps = [float(t) for t in scheduler.timesteps.cpu()]
            trace = list(model.trace) if isinstance(model, TStitch) else []
        outs.append(x.float())
    bar.close()
    x = torch.cat(outs) if outs else torch.empty(0, c, size, size)
    if vae is not None:
        images = vae.decode(x.to(dtype=next(vae.parameters()).dtype) / vae.config.scaling_factor).sample.float()
    else:
        images = x
    images = (images / 2 + 0.5).clamp(0, 1)
    return SampleResult(images=images.cpu(), seconds=time.perf_counter() - start, trace=trace, timesteps=timesteps)


def parse_stitch(spec: str) -> tuple[str, float]:
    """`NAME@FRACTION` (the CLI's `--stitch dit_nano_patch2_8.digits@0.4`) -> (name, fraction)."""
    name, at, fraction = spec.rpartition("@")
    try:
        value = float(fraction)
    except ValueError:
        value = None
    if not at or not name or value is None:
        raise ConfigError(f"--stitch {spec!r}: write MODEL@FRACTION, e.g. --stitch dit_nano_patch2_8.digits@0.4")
    return name, value


def _denoiser(model: nn.Module | str) -> nn.Module:
    from zoo.hub import load

    return load(model) if isinstance(model, str) else model


def generate(model: nn.Module | str, *, stitch: Sequence[tuple[nn.Module | str, float]] = (), scheduler: str = "ddim",
             steps: int = 50, n: int = 64, labels: Sequence[int] | None = None, guidance_scale: float = 1.0,
             seed: int = 0, batch_size: int | None = None, device: str | torch.device = "cpu",
             progress: bool = True, **scheduler_kwargs: Any) -> SampleResult:
    """`n` samples of `model` (a name `zoo.load` takes, or a model), T-Stitched after the `stitch` models (each
    with its fraction of the trajectory, the rest to `model`), with a named scheduler; labels cycle through the
    classes unless given; a latent model's samples are decoded by its card's VAE. Checks everything before
    sampling; `result.flops` is FLOPs per sample, `result.trace` the model of every step."""
    large = _denoiser(model)
    smalls = [(_denoiser(m), float(f)) for m, f in stitch]
    rest = 1.0 - sum(f for _, f in smalls)
    if smalls:
        names = [m if isinstance(m, str) else f"model {i}" for i, (m, _) in enumerate(stitch)]
        names.append(model if isinstance(model, str) else "the large model")
        denoiser: nn.Module = TStitch(*[m for m, _ in smalls], large, fractions=[*(f for _, f in smalls), rest],
                                      names=names)
    else:
        denoiser = large
    sched = make_scheduler(scheduler, schedule_of(large), **scheduler_kwargs)
    if steps < 1 or n < 1:
        raise ConfigError(f"steps and n must be >= 1, got steps={steps}, n={n}")
    _, classes = _conditioning(large)
    if labels is None:
        labels = [i % classes for i in range(n)] if classes else [0] * n
    bad = [y for y in labels if classes is not None and not 0 <= int(y) < classes]
    if bad:
        raise ConfigError(f"labels {sorted(set(bad))[:5]} are outside the model's classes 0..{classes - 1}")
    latent = (getattr(large, "pretrained_cfg", None) or {}).get("latent")
    vae = None
    if latent:
        from zoo.hub import load_vae

        vae = load_vae(latent["vae"]).to(device)
    denoiser.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    result = sample(denoiser, sched, labels, steps=steps, guidance_scale=guidance_scale, generator=generator,
                    vae=vae, batch_size=batch_size, progress=progress)
    if not result.trace:
        result.trace = [0] * len(result.timesteps)
    result.flops = sampling_flops(denoiser, result.trace, guidance_scale)
    result.labels = list(labels)
    return result


def forward_flops(model: nn.Module) -> int:
    """FLOPs of one forward of one sample (torch's counter: 2 per multiply-add), at the model's input size."""
    from torch.utils.flop_counter import FlopCounterMode

    config = _config_of(model)
    p = next(model.parameters())
    x = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size, device=p.device, dtype=p.dtype)
    kind, classes = _conditioning(model)
    y = torch.zeros(1, dtype=torch.long, device=p.device) if kind == "class" else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, timestep=torch.full((1,), 500, device=p.device), class_labels=y)
    return int(counter.get_total_flops())


def sampling_flops(model: nn.Module, trace: Sequence[int], guidance_scale: float = 1.0) -> int:
    """FLOPs per generated sample of a run whose steps ran `trace`'s models (doubled by guidance)."""
    per_model = [forward_flops(m) for m in denoiser_models(model)]
    return sum(per_model[i] for i in trace) * (2 if guidance_scale > 1 else 1)


__all__ = ["TStitch", "sample", "generate", "parse_stitch", "SampleResult", "make_scheduler", "SCHEDULERS", "DEFAULT_SCHEDULE", "schedule_of",
           "check_stitchable", "forward_flops", "sampling_flops", "denoiser_models"]
