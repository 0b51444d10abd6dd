"""Load-balancing and router z-loss, as per-layer statistics pooled over layers.

Legend: T tokens, E experts, K top-k.
The balance loss equals transformers' `load_balancing_loss_func`: counts and probabilities are summed over all MoE layers
first (padding tokens excluded by the mask), then E * sum_e(frac_tokens_e * mean_prob_e). Keeping per-layer sums instead
of every layer's [T, E] logits keeps memory at O(E) per layer and lets a distributed reducer add them across ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from framework.moe.router import Routing


class RouterStats(NamedTuple):
    """One layer's contribution to the auxiliary losses (sums, not means, so layers and ranks add up)."""

    tokens_per_expert: torch.Tensor  # [E] float32, masked top-k assignment counts (no grad)
    prob_sum: torch.Tensor  # [E] float32, masked sum of router probabilities (carries the router's gradient)
    z_sum: torch.Tensor | None  # [] float32, masked sum of logsumexp(logits)^2; None: not computed (no z-loss)
    num_tokens: torch.Tensor  # [] float32, number of unmasked tokens


def router_stats(routing: Routing, token_mask_T: torch.Tensor | None, z_loss: bool = False) -> RouterStats:
    """Statistics of one layer's routing; `token_mask_T` is 1 for real tokens, 0 for padding (None: all real).
    `z_loss`: also the z-loss sum. Without it no logsumexp over [T, E] runs: ~0.3 ms of host time per layer at 4,096
    tokens, and its graph's fp32 copy of the logits would live as long as the output (PERF_NOTES change 13)."""
    probs_TE = routing.probs
    num_experts = probs_TE.shape[-1]
    top_k = routing.expert_ids.shape[-1]
    z_T = torch.logsumexp(routing.logits.float(), dim=-1).square() if z_loss else None
    z_sum = None
    if token_mask_T is None:
        weight_TK = torch.ones_like(routing.expert_ids, dtype=torch.float32)
        prob_sum = probs_TE.sum(dim=0)
        if z_loss:
            z_sum = z_T.sum()
        # torch.full, not torch.tensor: a host scalar copied to the GPU waits for the whole queue (a sync per layer).
        num_tokens = torch.full((), float(probs_TE.shape[0]), device=probs_TE.device)
    else:
        mask_T = token_mask_T.to(torch.float32)
        weight_TK = mask_T.unsqueeze(-1).expand(-1, top_k)
        prob_sum = (probs_TE * mask_T.unsqueeze(-1)).sum(dim=0)
        if z_loss:
            z_sum = (z_T * mask_T).sum()
        num_tokens = mask_T.sum()
    # scatter_add instead of bincount: no device-to-host sync.
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs_TE.device)
    counts.scatter_add_(0, routing.expert_ids.reshape(-1), weight_TK.reshape(-1))
    return RouterStats(counts, prob_sum, z_sum, num_tokens)


def load_balancing_loss(stats: list[RouterStats], scope: str = "pooled") -> torch.Tensor:
    """transformers' Switch-style loss pooled over layers (scope "pooled"; balanced routing gives top_k), or
    per_layer_load_balancing_loss (scope "per_layer")."""
    if scope == "per_layer":
        return per_layer_load_balancing_loss(stats)
    if scope != "pooled":
        raise ValueError(f"aux loss scope {scope!r}: expected pooled or per_layer")
    counts = torch.stack([s.tokens_per_expert for s in stats]).sum(0)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)
    rows = torch.stack([s.num_tokens for s in stats]).sum()
    num_experts = counts.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def per_layer_load_balancing_loss(stats: list[RouterStats]) -> torch.Tensor:
    """The same Switch-style loss computed per MoE layer, then averaged over layers (Megatron's and torchtitan's
    convention). The pooled form cannot see a layer that collapses onto experts other layers leave idle: the pooled
    counts still look even. Balanced routing gives top_k here too."""
    losses = [s.tokens_per_expert.shape[0] * torch.sum((s.tokens_per_expert / s.num_tokens) *
                                                       (s.prob_sum / s.num_tokens)) for s in stats]
    return torch.stack(losses).mean()


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor | None:
    """ST-MoE z-loss: mean over layers and tokens of logsumexp(logits)^2; None when the blocks did not compute it."""
    if any(s.z_sum is None for s in stats):
        return None
    z = torch.stack([s.z_sum for s in stats]).sum()
    rows = torch.stack([s.num_tokens for s in stats]).sum()
    return z / rows
