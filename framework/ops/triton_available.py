"""Whether a tensor's op can run on our Triton kernels: CUDA tensors, Triton importable, not disabled.

FRAMEWORK_DISABLE_TRITON=1 forces the torch paths (for A/B benchmarks and for bisecting a numerical difference).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    return os.environ.get("FRAMEWORK_DISABLE_TRITON", "0") != "1" and importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_importable()
