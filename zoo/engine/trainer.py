"""The one training loop. It never knows which method it runs (see recipes/base.py).

`pretrain(recipe)` builds the method from the recipe, reads shards (or generated built-in data)
through `zoo.data.loader` with the method's transform and collate, steps the optimizer (AdamW, SGD
or LARS) with gradient accumulation and clipping on the scheduled lr and weight decay, evaluates the
method's declared schedules and calls its hooks, writes `config.yaml`, `metrics.jsonl` and atomic
checkpoints to the run directory, resumes exactly (model, optimizer, RNG streams and the position in
the epoch), evaluates the final backbone and publishes what the method exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from zoo.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zoo.engine.contract import Export, Progress
from zoo.engine.distributed import (
    average_gradients,
    full_state,
    gather_objects,
    init_distributed,
    load_full_state,
    rank_summary,
    shard_fsdp,
)
from zoo.errors import ConfigError, UnknownNameError, ZooError
from zoo.progress import progress
from zoo.schedule import Schedule

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
KEYS_TRACKED = 100_000  # per rank; enough to check the rank split without growing with the run
EVAL_BUILTIN_N = 2000  # samples of a 'builtin:NAME' eval set (digits: its whole split)


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    run_dir: Path
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    published: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # the backbone's: {task: {metric: value}}
    export_evals: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # {published name: {task: ...}}


def build_method(cfg) -> torch.nn.Module:
    """The registered method of `cfg.method.name`, built with the method's and the model's args."""
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


def data_root() -> Path:
    """Where generated built-in shards are kept: `$ZOO_HOME/data`."""
    from zoo.hub import zoo_home

    return zoo_home() / "data"


def resolve_data(source: str | None, split: str, backbone: torch.nn.Module, n: int,
                 size: int | None = None) -> str | None:
    """A shard pattern for `source`, generating 'builtin:NAME' shards at `size`, by default the backbone's input size."""
    from zoo.data.builtin import BUILTIN_PREFIX, resolve_source

    if source is None or BUILTIN_PREFIX not in source:
        return source
    if size is None:
        pcfg = getattr(backbone, "pretrained_cfg", None) or {}  # a text model has no image size: the default 32 px
        size = int(pcfg.get("input_size", (3, 32, 32))[-1])
    return resolve_source(source, split=split, root=data_root(), size=size, n=n)


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
    """Train `recipe` (an installed recipe's name, a YAML path or a dict) and return the run's result.

    `resume=True` continues from the latest checkpoint in the run directory (or a given path);
    `stop_after` ends the process's work after that many steps (the run stays resumable)."""
    trainer = Trainer(recipe, data=data, overrides=overrides, run_dir=run_dir, resume=resume, overwrite=overwrite)
    try:
        trainer.fit(stop_after=stop_after, on_step=on_step)
    finally:
        trainer.close()
    return trainer.finish()


class Trainer:
    """One run: the set-up (`__init__`), the loop (`fit`), the end (`finish`). Rank 0 writes the run directory."""

    def __init__(self, recipe, *, data=None, overrides=(), run_dir=None, resume=False, overwrite=False):
        from zoo.config import load_config, save_config

        cfg = self.cfg = load_config(recipe, list(overrides))
        if data is not None:
            cfg.data.train = data
        default_name = "run" if isinstance(recipe, dict) else Path(str(recipe)).stem
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.output.run_dir(default_name)
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
        self.rank, self.world, self.owns_group = init_distributed(device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        self.device, self.main = device, self.rank == 0
        self.sharded = cfg.distributed == "fsdp" and self.world > 1
        ckpt_path = None
        if self.main:
            ckpt_path = prepare_run_dir(self.run_dir, resume, overwrite)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self._barrier()  # the others read the run directory only once rank 0 has settled it
        if not self.main and resume:
            ckpt_path = latest_checkpoint(self.run_dir) if resume in (True, "auto") else Path(resume)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        method = self.method = build_method(cfg).to(device)
        if cfg.init_from and ckpt_path is None:
            self._init_from(cfg.init_from)
        if cfg.output.publish:
            checked_exports(method, cfg)
        if self.world > 1:
            for t in [*method.parameters(), *method.buffers()]:
                torch.distributed.broadcast(t.data, src=0)
            torch.manual_seed(cfg.seed + self.rank)  # each rank its own masking/augmentation stream
        self.loader, self.size = self._make_loader()
        method.on_data(self.loader.size)  # before the resume: state kept per sample gets its shape
        batches = len(self.loader) if self.size is not None or cfg.data.resampled else 0
        if not batches:
            raise ZooError(f"{self.data_source} holds fewer samples than one batch of {cfg.data.batch_size}")
        self.steps_per_epoch = batches / cfg.optim.accum_steps  # optimizer steps
        self.total = int(cfg.schedule.steps) if cfg.schedule.steps is not None else \
            max(1, int(math.ceil(cfg.schedule.epochs * self.steps_per_epoch)))
        self.schedules = self._schedules()
        self.publishable = self._unsharded_copy() if self.sharded and self.main else method  # what exports read
        if self.sharded:
            shard_fsdp(method)
        if cfg.compile:
            for block in method.repeated_blocks():
                block.compile()
        self.trainable = [p for p in method.parameters() if p.requires_grad]
        self.opt = build_optimizer(method.param_groups(cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.lr_mult),
                                   cfg.optim, self.schedules["lr"].start)
        self.fp = fingerprint(cfg)
        self.step, self.epoch, self.skip = 0, 0, 0
        if ckpt_path is not None:
            self._resume(ckpt_path)
        self.online = None
        if cfg.eval.every and cfg.eval.train and cfg.eval.val:
            from zoo.eval.online import OnlineKNN

            k = cfg.eval.k if isinstance(cfg.eval.k, int) else cfg.eval.k[0]
            self.online = OnlineKNN(*self._eval_data(), every=cfg.eval.every, k=k,
                                    temperature=cfg.eval.temperature)
        self.result = RunResult(run_dir=self.run_dir, steps=self.step)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a") if self.main else open(os.devnull, "w")
        self.board = _tensorboard(self.run_dir / "tb") if self.main and cfg.output.tensorboard else None
        self.bar = progress(total=self.total, initial=self.step, desc=cfg.method.name, unit="step", quiet=not self.main)
        self.seen, self.dropped, self.accum = 0, 0, 0
        self.keys: set[str] = set()  # samples this rank trained on (the first KEYS_TRACKED), for the overlap check
        self.last_batch: dict[str, Any] | None = None
        self.batch_in_epoch = self.skip

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None, on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """Micro-batches -> forward/backward; every `accum_steps` of them (across epoch ends too) one
        optimizer step, its hooks, logging, online kNN and checkpoints."""
        limit = self.total if stop_after is None else min(self.total, self.step + stop_after)
        self.method.train()
        self.t0 = time.perf_counter()
        if self.step >= limit:
            return
        for batch in self._batches():
            if self.accum == 0:
                self._set_scheduled()
            out = self._forward_backward(batch)
            self.accum += 1
            if self.accum < self.cfg.optim.accum_steps:
                continue
            self.accum = 0
            self._optimizer_step()
            row = self._log(out, on_step is not None)
            if on_step is not None:
                on_step(self.step, row)
            every = self.cfg.output.checkpoint_every  # 0: only at the end
            if (every and self.step % every == 0) or self.step == limit:
                self._checkpoint()
            if self.step >= limit:
                break

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Training batches from the resume position on, epoch after epoch."""
        while True:
            self.loader.set_epoch(self.epoch)
            for i, batch in enumerate(self.loader):
                if i < self.skip:
                    continue  # resuming mid-epoch: these batches were trained on before the checkpoint
                self.batch_in_epoch = i + 1
                yield batch
            self.epoch, self.skip, self.batch_in_epoch = self.epoch + 1, 0, 0

    def _forward_backward(self, batch: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        n = self.method.batch_size(batch)
        self.dropped += max(0, self.loader.last_batch_samples - n)  # samples a custom collate left out
        if self.world > 1 and len(self.keys) < KEYS_TRACKED:
            self.keys.update(batch.get("__key__", ()))
        batch = _to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            out = self.method.training_step(batch, self.step)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise ZooError(f"loss is {loss.item()} at step {self.step}; lower optim.lr or check the data")
        (loss / cfg.optim.accum_steps).backward()
        self.seen += n
        self.last_batch = batch
        return out

    def _optimizer_step(self) -> None:
        if self.world > 1 and not self.sharded:
            average_gradients(self.method, self.world)  # FSDP reduce-scatters its own
        if self.cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.clip_grad)
        self.method.before_optimizer_step(self.progress())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.method.on_step_end(self.progress())

    def progress(self):
        return Progress(self.step, self.total, self.epoch, self.steps_per_epoch)

    # -- schedules ----------------------------------------------------------------------------------
    def _schedules(self) -> dict[str, Schedule]:
        """lr, weight decay and the method's declared values, with the recipe's `schedules:` overrides."""
        cfg = self.cfg
        base_lr = cfg.optim.resolved_lr(cfg.data.batch_size * cfg.optim.accum_steps * self.world)
        out = {"lr": cfg.schedule.lr_schedule(base_lr)}
        if cfg.optim.weight_decay_end is not None:
            out["weight_decay"] = Schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, shape="cosine",
                                           truncate=cfg.schedule.truncate)
        declared = dict(self.method.schedules())
        for name, fields in cfg.schedules.items():
            if name not in declared:
                from zoo.registry import close_matches

                hint = close_matches(name, list(declared), n=1)
                valid = ", ".join(declared) or "none"
                raise ConfigError(f"schedules.{name}: {type(self.method).__name__} schedules no value {name!r}"
                                  + (f"; did you mean 'schedules.{hint[0]}'?" if hint else "")
                                  + f" (its schedules: {valid}; lr and weight decay are set in schedule/optim)")
            try:
                declared[name] = replace(declared[name], **fields)
            except TypeError as e:
                raise ConfigError(f"schedules.{name}: {e}; a schedule has start, end, shape, warmup_steps, "
                                  "warmup_epochs, warmup_frac, warmup_from, truncate") from None
        return {**out, **declared}

    def _set_scheduled(self) -> None:
        """This step's values: lr and weight decay into the optimizer groups, the rest into the method."""
        now = {k: s(self.step, self.total, self.steps_per_epoch) for k, s in self.schedules.items()}
        for g in self.opt.param_groups:
            g["lr"] = now["lr"] * g.get("lr_scale", 1.0)
            if "weight_decay" in now and g.get("decay", True):
                g["weight_decay"] = now["weight_decay"]
        self.method.scheduled.update({k: v for k, v in now.items() if k not in ("lr", "weight_decay")})
        self.now = now

    # -- logging, evals, checkpoints ----------------------------------------------------------------
    def _log(self, out: dict[str, Any], wanted: bool) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        knn = None
        if self.online is not None and step % self.online.every == 0:
            current = self.refresh_publishable()
            knn = self.online(current.backbone(), step) if self.main else None
        log_now = step % cfg.output.log_every == 0 or step == self.total or bool(knn)
        line_now = self.bar.due()  # a progress line (no terminal) shows this step's values
        row: dict[str, float] = {}
        if log_now or wanted or line_now:  # reading values off the device syncs: only when they are used
            row = {"step": step, **self.now,
                   **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}, **(knn or {})}
        img_per_s = self.seen * self.world / max(time.perf_counter() - self.t0, 1e-9)
        if log_now:
            row["img_per_s"] = img_per_s
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
            self.result.metrics.append(row)
            if self.board is not None:
                for k, v in row.items():
                    if k != "step":
                        self.board.add_scalar(k, v, step)
        if log_now or line_now:
            self.bar.set_postfix({"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "img/s": f"{img_per_s:.0f}",
                                  **({"knn": f"{row['knn_top1']:.1f}"} if "knn_top1" in row else {})})
        self.bar.update(1)
        return row

    def _checkpoint(self) -> None:
        model, optim = full_state(self.method, self.opt, sharded=self.sharded)  # collective under FSDP
        rngs = gather_objects(rng_state(), self.world)  # collective with several ranks
        if self.main:
            save_checkpoint(
                {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "model": model,
                 "optimizer": optim, "rng": rngs[0], "rng_ranks": rngs, "fingerprint": self.fp},
                self.run_dir, self.step, keep_last=self.cfg.output.keep_last,
            )

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, fingerprint=self.fp)
        load_full_state(self.method, self.opt, state["model"], state["optimizer"], sharded=self.sharded)
        self.step, self.epoch, self.skip = state["step"], state["epoch"], state["batch_in_epoch"]
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) != self.world:
            log.warning("checkpoint was written by %d rank(s), resuming on %d: random streams restart from rank 0's",
                        len(ranks), self.world)
        set_rng_state(ranks[self.rank] if ranks is not None and len(ranks) == self.world else state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def refresh_publishable(self) -> torch.nn.Module | None:
        """Rank 0's unsharded method with the current weights (collective under FSDP)."""
        if not self.sharded:
            return self.method
        model, _ = full_state(self.method, None, sharded=True)
        if self.main:
            self.publishable.load_state_dict(model)
        return self.publishable if self.main else None

    def close(self) -> None:
        self.bar.close()
        self.metrics_file.close()
        if self.board is not None:
            self.board.close()

    def finish(self) -> RunResult:
        """Rank summary, pictures, final evals, exports and done.json (once the run reached its total)."""
        cfg, result = self.cfg, self.result
        result.steps = self.step
        result.skipped = dict(self.loader.total_skipped)
        if self.dropped:
            result.skipped["dropped_by_collate"] = self.dropped
            log.warning("the method's collate left out %d samples", self.dropped)
        done: dict[str, Any] = {"steps": self.step, "world_size": self.world,
                                "distributed": cfg.distributed if self.world > 1 else None, "skipped": result.skipped}
        if self.world > 1:
            done.update(rank_summary(self.method, self.seen, self.keys, self.world))
        final = self.refresh_publishable()  # every rank: a collective under FSDP
        if self.main and result.metrics and cfg.output.plots:
            pictures = draw_plots(final, self.run_dir, result.metrics, self.last_batch)
            if cfg.output.tensorboard and pictures:
                board_pictures(self.run_dir / "tb", pictures, self.step)
        if self.step >= self.total and self.main:
            exports = checked_exports(final, cfg) if cfg.output.publish else {}
            result.evals, result.export_evals = self.final_evals(final, exports)
            result.published = publish_exports(final, cfg, self.step, result.export_evals, data=self.data_source,
                                               exports=exports)
            done["eval"] = result.evals
            if set(result.export_evals) - {cfg.output.publish}:
                done["export_eval"] = result.export_evals
            done["published"] = {k: str(v) for k, v in result.published.items()}
            (self.run_dir / DONE_FILE).write_text(json.dumps(done) + "\n")
        if self.owns_group:
            torch.distributed.destroy_process_group()
        return result

    def final_evals(self, method, exports: dict[str, Export] | None = None
                    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """`eval.final` protocols on the final backbone ({task: {"knn_top1": ..., ...}}) and on every exported
        image backbone ({name: {task: ...}}): the backbone is evaluated once, whatever it is published as; a
        model without `forward_features` (a whole CLIP model) is left to its own protocols."""
        cfg = self.cfg
        if not (cfg.eval.final and cfg.eval.train and cfg.eval.val):
            return {}, {}
        from zoo.eval.protocols import evaluate

        train, val = self._eval_data()
        task = cfg.eval.val.removeprefix("builtin:") if cfg.eval.val.startswith("builtin:") else Path(val).parent.name

        def run(model, what: str) -> dict[str, dict[str, float]]:
            with torch.random.fork_rng(devices=[]):
                res = evaluate(model, train, val, protocols=cfg.eval.final, k=cfg.eval.k, temperature=cfg.eval.temperature,
                               linear_variants=cfg.eval.linear_variants, desc=f"final eval {task} ({what})")
            log.info("final eval of %s on %s: %s", what, task, res)
            return {task: {k: round(v, 2) for k, v in res.items()}}

        backbone = method.backbone()
        main = run(backbone, "backbone")
        per_export = {}
        for name, export in (exports or {}).items():
            if export.model is backbone:
                per_export[name] = main
            elif hasattr(export.model, "forward_features"):
                per_export[name] = run(export.model, name)
        return main, per_export

    # -- set-up pieces ------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _init_from(self, name: str) -> None:
        from zoo.hub import load

        try:
            source = load(name)
        except UnknownNameError as e:
            raise ConfigError(f"init_from: {e}") from None
        self.method.init_backbone(source.to(self.device), name)
        log.info("initialised the backbone from %s", name)

    def _eval_data(self) -> tuple[str, str]:
        backbone = self.method.backbone()
        if self.main:
            train = resolve_data(self.cfg.eval.train, "train", backbone, EVAL_BUILTIN_N)
            val = resolve_data(self.cfg.eval.val, "val", backbone, EVAL_BUILTIN_N)
        self._barrier()
        if not self.main:
            train = resolve_data(self.cfg.eval.train, "train", backbone, EVAL_BUILTIN_N)
            val = resolve_data(self.cfg.eval.val, "val", backbone, EVAL_BUILTIN_N)
        return train, val

    def _make_loader(self):
        from zoo.data import dataset_size, loader

        cfg, method = self.cfg, self.method
        source = train_source(cfg)
        if source is None:
            raise ConfigError("no training data: give --data 'shards/{00000..00009}.tar', or set data.train "
                              "(or data.builtin: fractals | scenes | digits) in the recipe")
        backbone = method.backbone()
        self.data_source = data_description(cfg)
        spec = method.data_spec()
        builtin = not cfg.data.train

        def shards() -> str:
            urls = resolve_data(source, "train", backbone, cfg.data.builtin_n, spec.builtin_size)
            return spec.prepare(urls, builtin) if spec.prepare is not None else urls

        if self.main:
            urls = shards()
        self._barrier()  # rank 0 generates built-in shards (and the method's derived ones) first
        if not self.main:
            urls = shards()
        transform = spec.sample_transform(backbone)

        def prepare(sample: dict[str, Any]) -> dict[str, Any]:
            out = transform(sample)
            out["__key__"] = f"{sample.get('__url__')}#{sample.get('__key__')}"  # for the ranks' overlap check
            if "__index__" in sample:
                out["__index__"] = sample["__index__"]
            return out

        size = None if cfg.data.resampled and cfg.data.epoch_samples else dataset_size(urls, scan=True)
        data = loader(
            urls, fields=spec.fields, optional_fields=spec.optional_fields, transform=prepare, collate=spec.collate,
            batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, resampled=cfg.data.resampled,
            epoch_samples=cfg.data.epoch_samples or (size if cfg.data.resampled else None), shuffle=cfg.data.shuffle,
            seed=cfg.seed, drop_last=spec.drop_last, index=spec.index, weights=cfg.data.weights,
        )
        return data, size

    def _unsharded_copy(self) -> torch.nn.Module:
        """A plain copy of the method on rank 0, refreshed from the FSDP shards for evals, plots and export."""
        with torch.random.fork_rng(devices=[]):  # building draws random init: keep the training streams untouched
            copy = build_method(self.cfg).to(self.device)
            copy.on_data(self.loader.size)
        copy.requires_grad_(False)
        return copy


def build_optimizer(groups: list[dict[str, Any]], optim, lr: float) -> torch.optim.Optimizer:
    """`optim.name`: AdamW, SGD with momentum, or LARS (timm's, for large-batch SGD)."""
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas))
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=optim.momentum)


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists and dicts: multi-crop views) moved to the device."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and torch.is_tensor(value[0]):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _tensorboard(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None (metrics.jsonl has it all)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no tb/ events (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder))


def draw_plots(method, run_dir: Path, metrics: list[dict[str, Any]], batch: dict[str, Any] | None) -> list[Path]:
    """plots/: one curve per logged metric, and the method's own pictures of the last batch (returned)."""
    from zoo.engine.plots import curve

    steps = [m["step"] for m in metrics]
    for key in sorted({k for m in metrics for k in m} - {"step"}):
        ys = [float(m.get(key, float("nan"))) for m in metrics]
        curve(steps, ys, run_dir / "plots" / f"{key}.png", title=f"{key} ({type(method).__name__})")
    if batch is None:
        return []
    was = method.training
    method.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return [Path(p) for p in method.draw(batch, run_dir / "plots") or ()]
    finally:
        method.train(was)


def board_pictures(folder: Path, pictures: Sequence[Path], step: int) -> None:
    """The method's pictures as TensorBoard images (tag `plots/STEM`) at `step`, beside the scalars in `folder`."""
    from zoo.engine.plots import PICTURE_SUFFIXES, image_pixels

    board = _tensorboard(folder)  # the run's writer is closed with the loop: this adds one events file
    if board is None:
        return
    try:
        for path in pictures:
            if path.suffix.lower() in PICTURE_SUFFIXES:
                board.add_image(f"plots/{path.stem}", image_pixels(path), step, dataformats="HWC")
    finally:
        board.close()


def data_description(cfg) -> str | None:
    """What a run trained on, as cards record it: the shards, or `builtin:NAME (n=N)`."""
    source = train_source(cfg)
    return f"{source} (n={cfg.data.builtin_n})" if source and not cfg.data.train else source


def train_source(cfg) -> str | None:
    """The training shards' source: `data.train`, else the built-in set(s) of `data.builtin` ('scenes', or a
    '::'-joined mix such as 'scenes::fractals', weighted by `data.weights`)."""
    if cfg.data.train or not cfg.data.builtin:
        return cfg.data.train
    return "::".join(f"builtin:{name}" for name in cfg.data.builtin.split("::"))


def publish_exports(method, cfg, steps: int, evals: dict[str, dict[str, dict[str, float]]] | None = None,
                    data: str | None = None, exports: dict[str, Export] | None = None) -> dict[str, Path]:
    """Publish every model the method exports for `output.publish` (or `exports`, already checked), each
    under its full name, with its own final evals (`evals`: {name: {task: results}}) in its card."""
    from zoo.hub import publish

    if not cfg.output.publish:
        return {}
    out = {}
    for name, export in (exports if exports is not None else checked_exports(method, cfg)).items():
        card = {"recipe": cfg.method.name, "data": data or cfg.data.train, "steps": steps, **export.card}
        if evals and evals.get(name):
            card["eval"] = evals[name]
        out[name] = publish(export.model, name, card, overwrite=True)
    return out


def checked_exports(method, cfg) -> dict[str, Export]:
    """What the method exports for `output.publish`, every name checked (the engine checks them
    before training too, so a bad name fails in seconds, not after the run)."""
    exports = {name: item if isinstance(item, Export) else Export(item)
               for name, item in method.export(cfg.output.publish).items()}
    for name, export in exports.items():
        arch = getattr(export.model, "zoo_arch", None)
        if arch is None:
            raise ConfigError(f"{type(method).__name__} exports {name!r}, but that model is not a zoo model; "
                              "export models built with zoo.create_model(ARCH)")
        if not name.startswith(f"{arch}."):
            tag = cfg.output.publish.split(".", 1)[-1]
            raise ConfigError(f"{type(method).__name__} exports {name!r}, but that model is {arch}: "
                              f"a published name is 'ARCH.TAG' of its own arch; set output.publish to '{arch}.{tag}'")
    return exports


__all__ = ["pretrain", "Trainer", "RunResult", "CheckpointError", "build_optimizer", "publish_exports", "checked_exports", "data_description"]
