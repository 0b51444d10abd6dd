"""An independent float64 MoE reference: one token and one expert at a time, no sorting, no grouped GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                  gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = expert_ids[t,k], in float64."""
    x, w = x_TH.double(), weights_TK.double()
    gu, down = gate_up_E2IH.double(), down_EHI.double()
    inter = gu.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(expert_ids_TK.shape[1]):
            e = int(expert_ids_TK[t, k])
            h = F.silu(gu[e, :inter] @ x[t]) * (gu[e, inter:] @ x[t])
            out[t] = out[t] + w[t, k] * (down[e] @ h)
    return out


def route_reference(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, norm: bool):
    probs = torch.softmax(x_TH.double() @ gate_EH.double().T, dim=-1)
    top, ids = torch.topk(probs, top_k, dim=-1)
    if norm:
        top = top / top.sum(-1, keepdim=True)
    return ids, top
