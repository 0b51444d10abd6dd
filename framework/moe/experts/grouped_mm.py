"""Experts on torch's native grouped GEMM (`torch._grouped_mm`, torch >= 2.8; CUTLASS kernels on sm90 bf16).

Legend: R routed rows, H hidden, I expert FFN, E experts.
Needs H and I to be multiples of 8 (bf16) / 4 (fp32): the kernels require 16-byte aligned strides.
"""

from __future__ import annotations

import torch

from framework.ops.swiglu import glu


def grouped_mm_experts(rows_RH: torch.Tensor, group_ends_E: torch.Tensor, weights_R: torch.Tensor | None,
                       gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, act) -> torch.Tensor:
    # The group ends are _grouped_mm's `offs` as they are, and they stay on the device: no host sync here.
    gate_up_R2I = torch._grouped_mm(rows_RH, gate_up_E2IH.transpose(-2, -1), offs=group_ends_E)
    return torch._grouped_mm(glu(gate_up_R2I, act, weights_R), down_EHI.transpose(-2, -1), offs=group_ends_E)
