"""torchrun support for the engine: the process group, DDP-style gradient averaging, FSDP2 sharding,
full (unsharded) state for checkpoints and exports, and the end-of-run rank summary.

Methods step through `training_step`, not a wrapped `forward`, so DDP's wrapper does not apply:
gradients are averaged explicitly, and FSDP2 is told that `training_step` is a forward method.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group): torchrun's env, gloo on CPU, nccl on GPU."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, True


def average_gradients(module: nn.Module, world: int) -> None:
    """All-reduce and average the gradients in one flat buffer (DDP's job, done explicitly)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shard_fsdp(method: nn.Module) -> None:
    """FSDP2: each repeated block its own unit, the rest in the root; `training_step` unshards the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in method.repeated_blocks():
        fully_shard(block)
    fully_shard(method)
    register_fsdp_forward_method(method, "training_step")


def full_state(method: nn.Module, opt: torch.optim.Optimizer | None, *, sharded: bool, everywhere: bool = False):
    """(model state, optimizer state) as full CPU tensors keyed by name. Collective when `sharded`
    (call it on every rank); then only rank 0 gets the tensors unless `everywhere`."""
    if not sharded:
        return method.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    model = get_model_state_dict(method, options=options)
    return model, (get_optimizer_state_dict(method, opt, options=options) if opt is not None else None)


def load_full_state(method: nn.Module, opt: torch.optim.Optimizer, model: dict, optim: dict, *, sharded: bool) -> None:
    """Load what `full_state` returned (every rank holds the full dicts; FSDP keeps its own shards)."""
    if not sharded:
        method.load_state_dict(model)
        opt.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, model, options=options)
    set_optimizer_state_dict(method, opt, optim, options=options)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may read every rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _SumWithGrad(torch.autograd.Function):
    """The sum over ranks; the backward sums the ranks' gradients (every rank's output read every input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (equal shapes) concatenated in rank order, as constants (no gradient); `x` alone
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (equal shapes) concatenated in rank order, differentiable: a loss on any rank reaches
    the rows' own rank (gloo and nccl alike). `x` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks, differentiable (partial sums of a sharded memory bank); `x` alone without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _SumWithGrad.apply(x)


def gather_objects(obj: Any, world: int) -> list[Any]:
    """`obj` from every rank, in rank order (a list of one without a process group)."""
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rank_summary(method: nn.Module, seen: int, keys: set[str], world: int) -> dict[str, Any]:
    """Samples each rank trained on, how many were seen by more than one rank, and whether every
    rank ends with the same weights (full tensors under FSDP)."""
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    for p in method.parameters():
        total += (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum().cpu()
    per_rank = gather_objects((seen, sorted(keys), float(total)), world)
    key_sets = [set(k) for _, k, _ in per_rank]
    overlap = sum(len(key_sets[i] & key_sets[j]) for i in range(world) for j in range(i + 1, world))
    return {"samples_per_rank": [s for s, _, _ in per_rank], "overlapping_samples": overlap,
            "ranks_consistent": len({d for _, _, d in per_rank}) == 1}
