"""Expert parallelism for model construction: the placement (this rank's block of experts, the all-to-all dispatcher)
that `load_model(..., placement=expert_placement(groups))` builds every MoE block with. The DeepSpeed side (parameter
tags, leaf modules) is framework/zero/engine.py's.
"""

from __future__ import annotations

import functools

import torch

from framework.moe.placement import LOCAL, ExpertPlacement
from framework.parallel.ep_dispatch import AllToAllDispatcher
from framework.parallel.groups import ParallelGroups


def expert_placement(groups: ParallelGroups, zero_stage: int = 3, chunks: int = 1) -> ExpertPlacement:
    """Rank `groups.ep_rank`'s experts, tokens routed over the EP group (the local placement for ep_size 1) in
    `chunks` pipelined token chunks (`parallel.ep_chunks`). Under ZeRO-1/2 (`zero_stage` < 3) the blocks are also built
    as DeepSpeed MoE layers, which is how that optimizer finds expert parameters (framework/zero/deepspeed_moe.py)."""
    if groups.ep_size == 1:
        return LOCAL
    base = None
    if zero_stage < 3:
        from framework.zero.deepspeed_moe import deepspeed_moe_base  # noqa: PLC0415 - imports DeepSpeed

        base = deepspeed_moe_base(groups)
    return ExpertPlacement(groups.ep_size, groups.ep_rank,
                           functools.partial(AllToAllDispatcher, groups.ep_group, groups.ep_size, chunks=chunks), base)


@torch.no_grad()
def gather_full_experts(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """All experts [E, ...] from each EP rank's block (for checks and export)."""
    import torch.distributed as dist  # noqa: PLC0415

    parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.ep_group)
    return torch.cat(parts)
