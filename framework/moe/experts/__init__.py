"""Expert-compute backends over one weight layout, and how a backend name is resolved.

Every backend computes SwiGLU experts on rows already grouped by expert, from the same parameters:
`gate_up_proj` [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up) and `down_proj` [E, H, I], transformers 5's fused layout.
  eager       per-expert loop of F.linear; the numerical reference (one host sync per layer for the counts)
  grouped_mm  torch._grouped_mm (CUTLASS grouped GEMM on Hopper bf16; CPU kernels too)
  megablocks  MegaBlocks' dispatch kernels + grouped_gemm.gmm (CUDA, bf16 only)
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

BACKENDS = ("eager", "grouped_mm", "megablocks")
INSTALL_HINT = "bash tools/install_gpu_extras.sh  (or --wheelhouse DIR offline)"


def megablocks_import_error() -> str | None:
    """Why the megablocks backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    for module in ("megablocks.ops", "grouped_gemm"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a CUDA extension built against another torch
            return f"import {module} failed ({type(exc).__name__}: {exc})"
    return None


def resolve_backend(name: str) -> str:
    """Validate a backend name and resolve "auto": megablocks when it can run, else grouped_mm."""
    if name == "auto":
        return "megablocks" if megablocks_import_error() is None else "grouped_mm"
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    if name == "megablocks":
        why = megablocks_import_error()
        if why is not None:
            raise RuntimeError(f"MoE backend 'megablocks' is unavailable: {why}. Install the GPU extras with: "
                               f"{INSTALL_HINT}; or choose backend='grouped_mm'")
    return name


def compute_fn(name: str) -> Callable:
    """The expert-compute function of a resolved backend: f(rows_RH, counts_E, gate_up, down, act) -> [R, H]."""
    if name == "eager":
        from framework.moe.experts.eager import eager_experts
        return eager_experts
    if name == "grouped_mm":
        from framework.moe.experts.grouped_mm import grouped_mm_experts
        return grouped_mm_experts
    from framework.moe.experts.megablocks import megablocks_experts
    return megablocks_experts
