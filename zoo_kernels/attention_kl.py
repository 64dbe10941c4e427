"""KL between teacher and student attention distributions: UNIP's hybrid-attention distillation loss.

mean over (batch, head, query) of KL(softmax(q_t k_tᵀ·s_t) ‖ softmax(q_s k_sᵀ·s_s)) over keys, in
fp32, with no gradient to the teacher. Two backends, chosen at call time: a fused Triton kernel
that never stores an N×N map (CUDA, or the CPU through `TRITON_INTERPRET=1`), and the explicit
PyTorch reference. Triton is imported only when its backend runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from zoo.errors import ZooError
from zoo.kernels.triton_support import triton_unavailable

KL_BACKENDS = ("triton", "reference")
MAX_TRITON_HEAD_DIM = 128
_TRITON_MODULE = "zoo.kernels._attention_kl_triton"


def _check(q_t: torch.Tensor, k_t: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor) -> None:
    """Raise a ZooError naming the shapes unless they are (B, H, N, D) with matching B, H, N."""
    tensors = {"q_t": q_t, "k_t": k_t, "q_s": q_s, "k_s": k_s}
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
    if any(t.dim() != 4 for t in tensors.values()):
        raise ZooError(f"attention_kl expects (B, H, N, D) tensors; got {shapes}")
    if len({t.shape[:3] for t in tensors.values()}) != 1:
        raise ZooError(f"attention_kl needs the same (B, H, N) for all four tensors; got {shapes}")
    if q_t.shape[-1] != k_t.shape[-1] or q_s.shape[-1] != k_s.shape[-1]:
        raise ZooError(f"attention_kl needs q and k of one head dim within teacher and within student; got {shapes}")
    if q_t.shape[2] == 0:
        raise ZooError(f"attention_kl needs at least one token; got {shapes}")
    if len({t.device for t in tensors.values()}) != 1:
        devices = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ZooError(f"attention_kl needs all four tensors on one device; got {devices}")


def _scales(q_t: torch.Tensor, q_s: torch.Tensor, scale_t: float | None, scale_s: float | None) -> tuple[float, float]:
    """The given logit scales, D**-0.5 of each side where not given."""
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    return scale_t, q_s.shape[-1] ** -0.5 if scale_s is None else scale_s


def attention_kl_reference(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    scale_t: float | None = None,
    scale_s: float | None = None,
) -> torch.Tensor:
    """The explicit loss: builds the four N×N fp32 maps (logits and log-probabilities of each side)."""
    _check(q_t, k_t, q_s, k_s)
    scale_t, scale_s = _scales(q_t, q_s, scale_t, scale_s)
    dtype = torch.promote_types(q_s.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)
    with torch.autocast(q_s.device.type, enabled=False):
        log_pt = ((q_t.detach().to(dtype) @ k_t.detach().to(dtype).transpose(-2, -1)) * scale_t).log_softmax(-1)
        log_ps = ((q_s.to(dtype) @ k_s.to(dtype).transpose(-2, -1)) * scale_s).log_softmax(-1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def kl_triton_unavailable(device: torch.device | str, head_dims: tuple[int, ...] = ()) -> str | None:
    """Why the fused kernel cannot run for these tensors, or None when it can."""
    why = triton_unavailable(device)
    if why is None and any(d > MAX_TRITON_HEAD_DIM for d in head_dims):
        why = f"head dims {head_dims} exceed the kernel's {MAX_TRITON_HEAD_DIM}"
    return why


def _kernels() -> ModuleType:
    """The Triton module (kernels decorated when it is first imported)."""
    return importlib.import_module(_TRITON_MODULE)


class _FusedAttentionKL(torch.autograd.Function):
    """Triton forward (row lse's and KL) and backward (dq_s, dk_s recomputed blockwise)."""

    @staticmethod
    def forward(ctx, q_t, k_t, q_s, k_s, scale_t: float, scale_s: float):  # type: ignore[override]
        kl, lse_t, lse_s = _kernels().forward(q_t, k_t, q_s, k_s, scale_t, scale_s)
        ctx.save_for_backward(q_t, k_t, q_s, k_s, lse_t, lse_s)
        ctx.scales = (scale_t, scale_s)
        return kl.sum() / kl.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        q_t, k_t, q_s, k_s, lse_t, lse_s = ctx.saved_tensors
        if not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            return None, None, None, None, None, None
        dq, dk = _kernels().backward(q_t, k_t, q_s, k_s, *ctx.scales, lse_t, lse_s, grad)
        return (
            None, None, dq if ctx.needs_input_grad[2] else None, dk if ctx.needs_input_grad[3] else None, None, None
        )


def attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    scale_t: float | None = None,
    scale_s: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean KL(teacher ‖ student) of attention rows; Triton when it can run, else the reference."""
    _check(q_t, k_t, q_s, k_s)
    why = kl_triton_unavailable(q_s.device, (q_t.shape[-1], q_s.shape[-1]))
    if backend is None:
        backend = "reference" if why else "triton"
    elif backend not in KL_BACKENDS:
        raise ZooError(f"attention_kl backend {backend!r} is unknown; choose one of {', '.join(KL_BACKENDS)}")
    elif backend == "triton" and why:
        raise ZooError(f"attention_kl backend='triton' cannot run here: {why}")
    if backend == "reference":
        return attention_kl_reference(q_t, k_t, q_s, k_s, scale_t, scale_s)
    scale_t, scale_s = _scales(q_t, q_s, scale_t, scale_s)
    return _FusedAttentionKL.apply(q_t.detach(), k_t.detach(), q_s, k_s, float(scale_t), float(scale_s))
