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


def has_fast_grouped_mm() -> bool:
    """torch._grouped_mm has CUTLASS kernels on sm90+ (Hopper); elsewhere it loops over experts."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def resolve_backend(name: str) -> str:
    """Validate a backend name and resolve "auto".

    auto: grouped_mm on Hopper or newer (measured on H100 at Qwen3-30B-A3B shapes: 2.4x faster than megablocks at
    4096 tokens, 1.13x at 16384, within 8% at 65536: benchmarks/moe_layer.py); megablocks on older CUDA GPUs when it is
    installed; grouped_mm otherwise (CPU included).
    """
    if name == "auto":
        if has_fast_grouped_mm() or megablocks_import_error() is not None:
            return "grouped_mm"
        return "megablocks"
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    if name == "megablocks":
        why = megablocks_import_error()
        if why is not None:
            raise RuntimeError(f"MoE backend 'megablocks' is unavailable: {why}. Install the GPU extras with: "
                               f"{INSTALL_HINT}; or choose backend='grouped_mm'")
    return name


def compute_fn(name: str) -> Callable:
    """The expert-compute function of a resolved backend: f(rows_RH, group_ends_E, weights_R, gate_up, down, act)
    -> [R, H], `group_ends_E` the int32 cumulative row ends per expert (framework/ops/expert_sort.group_ends),
    `weights_R` each row's routing weight (applied before the second GEMM) or None for unweighted outputs."""
    if name == "eager":
        from framework.moe.experts.eager import eager_experts
        return eager_experts
    if name == "grouped_mm":
        from framework.moe.experts.grouped_mm import grouped_mm_experts
        return grouped_mm_experts
    from framework.moe.experts.megablocks import megablocks_experts
    return megablocks_experts
