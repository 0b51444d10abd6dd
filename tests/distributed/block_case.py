"""The MoE block and the forced-routing inputs shared by the EP block workers and their reference."""

from __future__ import annotations

import torch

from framework.moe.layer import MoEBlock

H, I, E, K, TOKENS = 32, 24, 8, 2, 6


def make_block() -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(H, I, E, K, True, torch.nn.SiLU(), backend="grouped_mm")
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
        # logits = s_e * sum(x): positive inputs pick the highest-numbered experts, negative inputs the lowest
        scale = torch.tensor([-2.5, -2.0, -1.5, -1.0, 1.0, 1.5, 2.0, 2.5])
        block.gate.weight.copy_(scale[:, None] * (1 + 0.1 * torch.rand(E, H)))
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
