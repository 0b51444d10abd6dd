"""Apply expert parallelism to a model: keep each rank's block of experts and install the all-to-all dispatcher.

Works on a model whose parameters are still on the meta device (pass it as `load_model(..., prepare=...)`), so a rank
never allocates or reads the experts it does not hold. The DeepSpeed side (parameter tags, leaf modules) is
framework/zero/engine.py's.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.moe.layer import MoEBlock
from framework.parallel.ep_dispatch import AllToAllDispatcher
from framework.parallel.groups import ParallelGroups


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> None:
    """Shrink every MoE block's experts to this rank's block [lo, hi) and route tokens over the EP group."""
    if groups.ep_size == 1:
        return
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        lo, hi = groups.expert_range(block.num_experts)
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        experts.num_experts = hi - lo
        experts.first_expert = lo
        block.dispatcher = AllToAllDispatcher(groups.ep_group, groups.ep_size, block.num_experts)


@torch.no_grad()
def gather_full_experts(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """All experts [E, ...] from each EP rank's block (for checks and export)."""
    import torch.distributed as dist  # noqa: PLC0415

    parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.ep_group)
    return torch.cat(parts)
