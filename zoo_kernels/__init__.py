"""zoo.kernels: the one attention entry point every model calls, and our custom kernels.

The backend is chosen at call time, never at import: `ZOO_ATTENTION=sdpa|math|xformers|flex|triton`
forces one, otherwise xformers on CUDA when importable and PyTorch SDPA everywhere else.
`attention_kl` is the fused attention-distribution KL (UNIP's distillation loss).
"""

from zoo.kernels.attention import (
    BACKENDS,
    attention,
    attention_varlen,
    attention_weights,
    available_backends,
    choose_backend,
)
from zoo.kernels.attention_kl import attention_kl, attention_kl_reference

__all__ = [
    "attention",
    "attention_weights",
    "attention_varlen",
    "available_backends",
    "choose_backend",
    "BACKENDS",
    "attention_kl",
    "attention_kl_reference",
]
