"""The one training loop. It never knows which method it runs (see recipes/base.py).

`pretrain(recipe)` builds the method from the recipe, reads shards through `zoo.data.loader`,
steps AdamW on a warmup-cosine schedule with gradient accumulation and clipping, writes
`config.yaml`, `metrics.jsonl` and atomic checkpoints to the run directory, resumes exactly
(model, optimizer, RNG streams and the position in the epoch), and publishes what the method exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from zoo.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zoo.engine.distributed import (
    average_gradients,
    full_state,
    gather_objects,
    init_distributed,
    load_full_state,
    rank_summary,
    shard_fsdp,
)
from zoo.engine.schedule import warmup_cosine
from zoo.errors import ConfigError, ZooError
from zoo.progress import progress_bar

log = logging.getLogger(__name__)

DONE_FILE = "done.json"


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    published: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def build_method(cfg) -> torch.nn.Module:
    """The registered method of `cfg.method.name`, built with the method's and the model's args."""
    import zoo.recipes  # noqa: F401  (registers the methods)
    from zoo.config import validate_method_args
    from zoo.registry import RECIPES

    factory = RECIPES.get(cfg.method.name).factory
    args = {"arch": cfg.model.arch, **cfg.method.args, **cfg.model.args}
    validate_method_args(factory, args, where="method")
    return factory(**args)


def fingerprint(cfg) -> str:
    """What a checkpoint must share with the recipe resuming it: method, model and data, not the schedule."""
    from zoo.config import to_dict

    d = to_dict(cfg)
    key = {k: d.get(k) for k in ("method", "model", "distributed")}
    key["data"] = {k: d["data"].get(k) for k in ("batch_size",)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _main_backbone(method: torch.nn.Module) -> torch.nn.Module:
    """The method's first exported backbone: it sets preprocessing and is what online kNN evaluates."""
    exported = method.export()
    if not exported:
        raise ZooError(f"{type(method).__name__}.export() returned no backbone: the engine needs one for preprocessing")
    return next(iter(exported.values()))


def _make_loader(cfg, method, seed: int):
    from zoo.data import dataset_size, loader
    from zoo.data.transforms import train_transform

    if not cfg.data.train:
        raise ConfigError("no training data: give --data 'shards/{00000..00009}.tar' or set data.train in the recipe")
    spec = method.data_spec()
    tf = train_transform(_main_backbone(method).pretrained_cfg, **spec.train_transform)

    def prepare(sample: dict[str, Any]) -> dict[str, Any]:
        out = {k: sample[k] for k in (*spec.fields, *spec.optional_fields) if k != "image" and k in sample}
        out["image"] = tf(sample["image"])
        if spec.prepare is not None:
            out = spec.prepare(out)
        out["__key__"] = f"{sample.get('__url__')}#{sample.get('__key__')}"  # for the ranks' overlap check
        return out

    data = loader(
        cfg.data.train, fields=spec.fields, optional_fields=spec.optional_fields, transform=prepare,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, resampled=cfg.data.resampled,
        epoch_samples=cfg.data.epoch_samples, shuffle=cfg.data.shuffle, seed=seed, drop_last=True,
    )
    size = None if cfg.data.resampled else dataset_size(cfg.data.train, scan=True)
    return data, size


def _total_steps(cfg, steps_per_epoch: int) -> int:
    if cfg.schedule.steps is not None:
        return int(cfg.schedule.steps)
    return max(1, int(math.ceil(cfg.schedule.epochs * steps_per_epoch / cfg.optim.accum_steps)))


def prepare_run_dir(run_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuses to clobber a finished run."""
    if overwrite and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    if resume not in (False, None, "", "auto", True):
        return Path(resume)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and run_dir.exists() and ((run_dir / DONE_FILE).exists() or latest_checkpoint(run_dir)):
        raise ZooError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    return ckpt


def pretrain(
    recipe: str | Path | dict,
    *,
    data: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train `recipe` (a YAML path or dict) and return the run's result.

    `resume=True` continues from the latest checkpoint in the run directory (or a given path);
    `stop_after` ends the process's work after that many steps (the run stays resumable)."""
    from zoo.config import load_config, save_config

    cfg = load_config(recipe, list(overrides))
    if data is not None:
        cfg.data.train = data
    default_name = "run" if isinstance(recipe, dict) else Path(str(recipe)).stem
    run_dir = Path(run_dir) if run_dir is not None else cfg.output.run_dir(default_name)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    rank, world, owns_group = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    main = rank == 0  # only rank 0 writes the run directory
    sharded = cfg.distributed == "fsdp" and world > 1
    ckpt_path = None
    if main:
        ckpt_path = prepare_run_dir(run_dir, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if world > 1:
        torch.distributed.barrier()  # the others read the run directory only once rank 0 has settled it
        if not main and resume:
            ckpt_path = latest_checkpoint(run_dir) if resume in (True, "auto") else Path(resume)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    method = build_method(cfg).to(device)
    if world > 1:
        for t in [*method.parameters(), *method.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
        torch.manual_seed(cfg.seed + rank)  # each rank its own masking/augmentation stream
    data_loader, size = _make_loader(cfg, method, cfg.seed)
    steps_per_epoch = len(data_loader) if size is not None or cfg.data.resampled else None
    if not steps_per_epoch:
        raise ZooError(f"{cfg.data.train} holds fewer samples than one batch of {cfg.data.batch_size}")
    total = _total_steps(cfg, steps_per_epoch)
    base_lr = cfg.optim.resolved_lr(cfg.data.batch_size * cfg.optim.accum_steps * world)
    publishable = _unsharded_copy(cfg, device) if sharded and main else method  # what exports read
    if sharded:
        shard_fsdp(method)
    if cfg.compile:
        for block in method.repeated_blocks():
            block.compile()
    groups = method.param_groups(cfg.optim.weight_decay, cfg.optim.layer_decay)
    opt = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.optim.betas))
    fp = fingerprint(cfg)

    step, epoch, skip = 0, 0, 0
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, fingerprint=fp)
        load_full_state(method, opt, state["model"], state["optimizer"], sharded=sharded)
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) != world:
            log.warning("checkpoint was written by %d rank(s), resuming on %d: random streams restart from rank 0's",
                        len(ranks), world)
        set_rng_state(ranks[rank] if ranks is not None and len(ranks) == world else state["rng"])
        log.info("resumed from %s at step %d", ckpt_path, step)

    def refresh_publishable() -> torch.nn.Module | None:
        """Rank 0's unsharded method with the current weights (collective under FSDP)."""
        if not sharded:
            return method
        model, _ = full_state(method, None, sharded=True)
        if main:
            publishable.load_state_dict(model)
        return publishable if main else None

    warmup = cfg.schedule.warmup(total)
    online = None
    if cfg.eval.every and cfg.eval.knn_train and cfg.eval.knn_val:
        from zoo.eval.online import OnlineKNN

        online = OnlineKNN(cfg.eval.knn_train, cfg.eval.knn_val, every=cfg.eval.every, k=cfg.eval.k)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if main else open(os.devnull, "w")
    board = _tensorboard(run_dir / "tb") if main and cfg.output.tensorboard else None
    result = RunResult(run_dir=run_dir, steps=step)
    limit = total if stop_after is None else min(total, step + stop_after)
    bar = progress_bar(total=total, initial=step, desc=cfg.method.name, unit="step", **({} if main else {"disable": True}))
    method.train()
    t0, seen = time.perf_counter(), 0
    keys: set[str] = set()  # samples this rank trained on (the first KEYS_TRACKED), for the overlap check
    last_images = None

    def checkpoint(batch_in_epoch: int, epoch_now: int) -> None:
        model, optim = full_state(method, opt, sharded=sharded)  # collective under FSDP
        rngs = gather_objects(rng_state(), world)  # collective with several ranks
        if main:
            save_checkpoint(
                {"step": step, "epoch": epoch_now, "batch_in_epoch": batch_in_epoch, "model": model,
                 "optimizer": optim, "rng": rngs[0], "rng_ranks": rngs, "fingerprint": fp},
                run_dir, step, keep_last=cfg.output.keep_last,
            )

    try:
        while step < limit:
            data_loader.set_epoch(epoch)
            accum = 0
            for i, batch in enumerate(data_loader):
                if i < skip:
                    continue  # resuming mid-epoch: these batches were trained on before the checkpoint
                lr = warmup_cosine(step, total, base_lr, warmup=warmup, final=cfg.schedule.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                if world > 1 and len(keys) < KEYS_TRACKED:
                    keys.update(batch.get("__key__", ()))
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    out = method.training_step(batch, step)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise ZooError(f"loss is {loss.item()} at step {step}; lower optim.lr or check the data")
                (loss / cfg.optim.accum_steps).backward()
                accum += 1
                seen += len(batch["image"])
                last_images = batch["image"][:8]
                if accum < cfg.optim.accum_steps:
                    continue
                accum = 0
                if world > 1 and not sharded:
                    average_gradients(method, world)  # FSDP reduce-scatters its own
                if cfg.optim.clip_grad:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                method.on_step_end(step, total)
                step += 1
                knn = None
                if online is not None and step % online.every == 0:
                    current = refresh_publishable()
                    knn = online(_main_backbone(current), step) if main else None
                log_now = step % cfg.output.log_every == 0 or step == limit or bool(knn)
                row: dict[str, float] = {}
                if log_now or on_step is not None:  # reading values off the device syncs: only when they are used
                    row = {"step": step, "lr": lr, **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}, **(knn or {})}
                if log_now:
                    row["img_per_s"] = seen * world / max(time.perf_counter() - t0, 1e-9)
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    result.metrics.append(row)
                    if board is not None:
                        for k, v in row.items():
                            if k != "step":
                                board.add_scalar(k, v, step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['img_per_s']:.0f}",
                                    **({"knn": f"{row['knn_top1']:.1f}"} if "knn_top1" in row else {}))
                bar.update(1)
                if on_step is not None:
                    on_step(step, row)
                every = cfg.output.checkpoint_every  # 0: only at the end
                if (every and step % every == 0) or step == limit:
                    checkpoint(i + 1, epoch)
                if step >= limit:
                    break
            else:
                epoch, skip = epoch + 1, 0
                continue
            break
    finally:
        bar.close()
        metrics_file.close()
        if board is not None:
            board.close()
    result.steps = step
    result.skipped = dict(data_loader.total_skipped)
    done = {"steps": step, "world_size": world, "distributed": cfg.distributed if world > 1 else None}
    if world > 1:
        done.update(rank_summary(method, seen, keys, world))
    final = refresh_publishable()  # every rank: a collective under FSDP
    if main and result.metrics:
        draw_plots(final, run_dir, result.metrics, last_images)
    if step >= total and main:
        result.published = publish_exports(final, cfg, step)
        done["published"] = {k: str(v) for k, v in result.published.items()}
        (run_dir / DONE_FILE).write_text(json.dumps(done) + "\n")
    if owns_group:
        torch.distributed.destroy_process_group()
    return result


KEYS_TRACKED = 100_000  # per rank; enough to check the rank split without growing with the run


def _unsharded_copy(cfg, device: torch.device) -> torch.nn.Module:
    """A plain copy of the method on rank 0, refreshed from the FSDP shards for evals, plots and export."""
    with torch.random.fork_rng(devices=[]):  # building draws random init: keep the training streams untouched
        copy = build_method(cfg).to(device)
    copy.requires_grad_(False)
    return copy


def _tensorboard(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None (metrics.jsonl has it all)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no tb/ events (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder))


def draw_plots(method, run_dir: Path, metrics: list[dict[str, Any]], images: torch.Tensor | None) -> None:
    """plots/: one curve per logged metric, and the method's reconstruction grid if it has one."""
    from zoo.engine.plots import curve, image_grid

    steps = [m["step"] for m in metrics]
    for key in sorted({k for m in metrics for k in m} - {"step"}):
        ys = [float(m.get(key, float("nan"))) for m in metrics]
        curve(steps, ys, run_dir / "plots" / f"{key}.png", title=f"{key} ({type(method).__name__})")
    if images is not None and hasattr(method, "reconstruct"):
        was = method.training
        method.eval()
        with torch.no_grad(), torch.random.fork_rng():
            rec = method.reconstruct(images, generator=torch.Generator(device=images.device).manual_seed(0))
        method.train(was)
        cfg = _main_backbone(method).pretrained_cfg
        rows = [rec[k] for k in ("original", "masked", "reconstruction", "pasted") if k in rec]
        image_grid(rows, run_dir / "plots" / "reconstruction.png", mean=cfg["mean"], std=cfg["std"])


def publish_exports(method, cfg, steps: int) -> dict[str, Path]:
    """Publish every backbone the method exports under `output.publish` (+ the export's tag suffix)."""
    from zoo.hub import publish

    if not cfg.output.publish:
        return {}
    out = {}
    for suffix, backbone in method.export().items():
        name = cfg.output.publish + (f"_{suffix}" if suffix else "")
        card = {"recipe": cfg.method.name, "data": cfg.data.train, "steps": steps}
        out[name] = publish(backbone, name, card, overwrite=True)
    return out


__all__ = ["pretrain", "RunResult", "CheckpointError"]
