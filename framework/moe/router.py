"""Top-k softmax router, numerically identical to transformers' Qwen3MoeTopKRouter.

Legend: T tokens, H hidden, E experts, K top-k.
Owns: the router weight `gate.weight` [E, H] and the routing decision. Does not own load-balancing losses (aux_loss.py)
or moving tokens (dispatch.py). No communication.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    """One layer's routing decision for T tokens."""

    weights: torch.Tensor  # [T, K] in the input dtype: combine weights
    expert_ids: torch.Tensor  # [T, K] int64, global expert ids
    probs: torch.Tensor  # [T, E] float32 softmax over all experts (for the aux loss)
    logits: torch.Tensor  # [T, E] in the input dtype (for the z-loss)


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})")
        self.top_k = top_k
        self.num_experts = num_experts
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TH, self.weight)
        # Softmax in fp32 like HF: a bf16 softmax flips the top-k set of ~1% of tokens.
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        top_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        return Routing(top_TK.to(logits_TE.dtype), ids_TK, probs_TE, logits_TE)
