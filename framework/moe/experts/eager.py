"""Per-expert loop over expert-sorted rows: the reference backend.

Legend: R routed rows, H hidden, I expert FFN, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_experts(rows_RH: torch.Tensor, group_ends_E: torch.Tensor, weights_R: torch.Tensor | None,
                  gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, act) -> torch.Tensor:
    outputs = []
    start = 0
    for e, end in enumerate(group_ends_E.tolist()):  # host sync: acceptable for the reference
        if end == start:
            continue
        rows = rows_RH[start:end]
        gate, up = F.linear(rows, gate_up_E2IH[e]).chunk(2, dim=-1)
        hidden = act(gate) * up
        if weights_R is not None:
            hidden = hidden * weights_R[start:end, None].to(hidden.dtype)
        outputs.append(F.linear(hidden, down_EHI[e]))
        start = end
    if not outputs:
        return rows_RH.new_zeros(0, down_EHI.shape[1])
    return torch.cat(outputs)
