"""zoo.kernels: the one attention entry point every model calls.

The backend is chosen at call time, never at import: `ZOO_ATTENTION=sdpa|math|xformers`
forces one, otherwise xformers on CUDA when importable and PyTorch SDPA everywhere else.
"""

from zoo.kernels.attention import BACKENDS, attention, available_backends

__all__ = ["attention", "available_backends", "BACKENDS"]
