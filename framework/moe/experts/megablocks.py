"""Experts on grouped_gemm's `gmm` (the GEMM MegaBlocks' dMoE uses). CUDA, bf16 only.

Legend: R routed rows, H hidden, I expert FFN, E experts.
`gmm` takes the per-expert counts on the host: one device-to-host copy per layer.
"""

from __future__ import annotations

import torch

from framework.ops.expert_sort import group_counts
from framework.ops.swiglu import glu


def megablocks_experts(rows_RH: torch.Tensor, group_ends_E: torch.Tensor, weights_R: torch.Tensor | None,
                       gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, act) -> torch.Tensor:
    from grouped_gemm.ops import gmm  # noqa: PLC0415 - CUDA-only, checked at backend resolution

    if rows_RH.dtype != torch.bfloat16 or gate_up_E2IH.dtype != torch.bfloat16:
        raise TypeError(f"MoE backend 'megablocks' computes in bfloat16 only (got activations {rows_RH.dtype}, "
                        f"weights {gate_up_E2IH.dtype}); load the model with dtype=torch.bfloat16 or use grouped_mm")
    batch_sizes = group_counts(group_ends_E.cpu())
    gate_up_R2I = gmm(rows_RH.contiguous(), gate_up_E2IH.contiguous(), batch_sizes, trans_b=True)
    return gmm(glu(gate_up_R2I, act, weights_R), down_EHI.contiguous(), batch_sizes, trans_b=True)
