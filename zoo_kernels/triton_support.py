"""Whether our Triton kernels can run for tensors on a device, and why not: one answer for every kernel.

Triton runs on CUDA, or on the CPU through its interpreter when TRITON_INTERPRET=1 was set before
triton was first imported (torch imports it early, so: before Python starts).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def interpret_env() -> bool:
    """TRITON_INTERPRET as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def imported_without_interpreter() -> bool:
    """Triton reads TRITON_INTERPRET once, when `triton.language` decorates its own jit functions."""
    language = sys.modules.get("triton.language")
    zeros = getattr(language, "zeros", None)
    return zeros is not None and type(zeros).__name__ != "InterpretedFunction"


def triton_unavailable(device: torch.device | str) -> str | None:
    """Why our Triton kernels cannot run for tensors on `device`, or None when they can."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'zoo[gpu]')"
    if device.type == "cuda":
        return None
    if not interpret_env():
        return "needs a CUDA device (or TRITON_INTERPRET=1 before starting Python, for Triton's slow CPU interpreter)"
    if imported_without_interpreter():
        return ("TRITON_INTERPRET=1 was set after triton was imported (torch imports it early); "
                "set it before starting Python")
    return None


def block_d(d: int) -> int:
    """A head dim padded to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (d - 1).bit_length())


def dot_precision(dtype: torch.dtype, device: torch.device, interpreted: bool) -> str:
    """tl.dot's input precision: fp32-accurate for fp32 inputs (three TF32 products on sm80+, IEEE
    elsewhere and in the interpreter), native for 16-bit inputs (where the setting is ignored)."""
    if dtype != torch.float32:
        return "tf32"
    if interpreted or device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device)[0] < 8:
        return "ieee"
    return "tf32x3"
