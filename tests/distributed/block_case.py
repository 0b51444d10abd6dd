"""The MoE block and the forced-routing inputs shared by the EP block workers and their reference."""

from __future__ import annotations

import torch

from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter
from framework.moe.placement import LOCAL, ExpertPlacement

H, I, E, K, TOKENS = 32, 24, 8, 2, 6


def make_block(placement: ExpertPlacement = LOCAL) -> MoEBlock:
    """The same weights for every placement: drawn for all experts, then `placement`'s block of them kept."""
    torch.manual_seed(0)
    full = MoEBlock(H, I, E, TopKRouter(H, E, K, True), torch.nn.SiLU(), backend="grouped_mm")
    with torch.no_grad():
        full.experts.gate_up_proj.normal_(0, 0.2)
        full.experts.down_proj.normal_(0, 0.2)
        # logits = s_e * sum(x): positive inputs pick the highest-numbered experts, negative inputs the lowest
        scale = torch.tensor([-2.5, -2.0, -1.5, -1.0, 1.0, 1.5, 2.0, 2.5])
        full.gate.weight.copy_(scale[:, None] * (1 + 0.1 * torch.rand(E, H)))
    if placement is LOCAL:
        return full
    block = MoEBlock(H, I, E, TopKRouter(H, E, K, True), torch.nn.SiLU(), backend="grouped_mm", placement=placement)
    lo, hi = placement.expert_range(E)
    with torch.no_grad():
        block.gate.weight.copy_(full.gate.weight)
        block.experts.gate_up_proj.copy_(full.experts.gate_up_proj[lo:hi])
        block.experts.down_proj.copy_(full.experts.down_proj[lo:hi])
    return block


def case_inputs(case: str, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    xs, dys = [], []
    for rank in range(world):
        x = torch.rand(1, TOKENS, H, generator=g) + 0.1
        if case == "remote" and rank % 2 == 1:
            x = -x
        xs.append(x)
        dys.append(torch.randn(1, TOKENS, H, generator=g))
    return xs, dys
