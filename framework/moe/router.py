"""The routers: top-k softmax (transformers' Qwen3MoeTopKRouter / MixtralTopKRouter) and group-limited sigmoid top-k
with a selection bias (DeepseekV3TopkRouter; GLM-4.5 routes the same way), each numerically identical to transformers'.

Legend: T tokens, H hidden, E experts, K top-k, G expert groups.
Owns: the router weight `gate.weight` [E, H], the sigmoid router's `gate.e_score_correction_bias` [E] and the routing
decision. Does not own load-balancing losses (aux_loss.py)
or moving tokens (dispatch.py). No communication.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.ops.softmax_topk import linear_softmax_topk


class Routing(NamedTuple):
    """One layer's routing decision for T tokens."""

    weights: torch.Tensor  # [T, K] in the input dtype: combine weights
    expert_ids: torch.Tensor  # [T, K] int64, global expert ids
    probs: torch.Tensor  # [T, E] float32, sums to 1 per token: the softmax over all experts (for the aux loss)
    logits: torch.Tensor  # [T, E] in the input dtype (for the z-loss)
    # [T, H] the router's input, for the dispatch to read: a router may hand it on through its own backward, to add
    # its x-gradient to the dispatch's in one GEMM (framework/ops/softmax_topk.py)
    tokens: torch.Tensor


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
        weights_TK, ids_TK, probs_TE, logits_TE, tokens_TH = linear_softmax_topk(x_TH, self.weight, self.top_k,
                                                                                 self.norm_topk_prob)
        return Routing(weights=weights_TK, expert_ids=ids_TK, probs=probs_TE, logits=logits_TE, tokens=tokens_TH)


class GroupLimitedSigmoidRouter(nn.Module):
    """DeepSeek-V3's routing ("noaux_tc"): sigmoid scores in fp32; experts are chosen on the scores plus
    `e_score_correction_bias` (a buffer: moved by auxiliary-loss-free balancing, never by gradients), only within the
    `topk_group` best of `n_group` groups (a group's score: the sum of its 2 best biased scores); the combine weights
    are the chosen experts' unbiased scores, renormalised when `norm_topk_prob` (+1e-20, as transformers), times
    `routed_scaling_factor`.

    The logits are computed in fp32 from the weight upcast, as transformers does (it also keeps the weight's storage
    in fp32; ours has the model's dtype, because DeepSpeed's flat bf16 groups take one dtype: the optimizer's fp32
    master holds its full precision). The bias stays fp32 whatever the model's dtype (`_apply`): bf16 would round away
    the small balancing steps. `probs` for the load-balancing statistics are the sigmoid scores normalised per token
    (DeepSeek-V3's sequence-wise balance loss uses these); `logits` are the fp32 router logits."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__()
        if n_group < 1 or num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts}) into groups of >= 2")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group ({topk_group}) must be between 1 and n_group ({n_group})")
        if not 1 <= top_k <= topk_group * (num_experts // n_group):
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the "
                             f"{topk_group * (num_experts // n_group)} experts of topk_group groups")
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() cast floating buffers: keep the bias fp32, from its unrounded value
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        with torch.no_grad():  # selection only: no gradient flows through the choice of experts
            ids_TK = self._select(scores_TE + self.e_score_correction_bias)
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return Routing(weights_TK.to(x_TH.dtype), ids_TK, probs_TE, logits_TE, x_TH)

    def _select(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """[T, K] expert ids: the top-k biased scores among the experts of each token's topk_group best groups."""
        tokens = choice_TE.shape[0]
        per_group = self.num_experts // self.n_group
        grouped_TGP = choice_TE.view(tokens, self.n_group, per_group)
        group_score_TG = grouped_TGP.topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_score_TG, k=self.topk_group, dim=-1, sorted=False)[1]
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(tokens, self.n_group, per_group).reshape(tokens, self.num_experts)
        return torch.topk(choice_TE.masked_fill(~keep_TE, float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
