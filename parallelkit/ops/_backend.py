"""Which implementation an op's local steps use: the Triton kernels or the same math in torch.

Triton runs on CUDA tensors. On the CPU the ops use their torch path, unless the interpreter is
asked for (``TRITON_INTERPRET=1`` together with ``PARALLELKIT_TRITON=1``, as the tests do), so
that the kernels themselves are what CPU tests exercise. ``PARALLELKIT_TRITON=0`` forces torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` should launch its Triton kernels."""
    choice = os.environ.get("PARALLELKIT_TRITON", "")
    if choice == "0" or not triton_available():
        return False
    if t.is_cuda:
        return True
    return choice == "1" and os.environ.get("TRITON_INTERPRET") == "1"
