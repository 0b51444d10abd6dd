"""Apply expert parallelism to a built model: keep each rank's block of experts, tag them for DeepSpeed, install the
all-to-all dispatcher.

Owns: the DeepSpeed parameter tags that make ZeRO treat expert weights as expert-parallel. Without them DeepSpeed
fails silently (measured, ../reference notes): untagged experts get rank 0's weights broadcast over them, or gradients
exactly ep x too large. `check_expert_tags` verifies them before the engine starts, because DeepSpeed checks nothing
for custom MoE modules.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.moe.layer import MoEBlock
from framework.parallel.ep_dispatch import AllToAllDispatcher
from framework.parallel.groups import ParallelGroups

# DeepSpeed's AutoEP family tag: stage3.py averages these gradients over the whole DP world (each EP rank's expert
# gradient already holds every EP peer's tokens) and adds an all-reduce over the EP group to the gradient norm.
EXPERT_FAMILY = "autoep_expert"


def tag_expert_param(param: nn.Parameter, groups: ParallelGroups) -> None:
    param.allreduce = False  # engine._broadcast_model: broadcast inside the EDP group only
    param.group_name = groups.group_name
    param.ds_zero_partition_process_group = groups.edp_group  # zero.Init: shard over EDP, not the world
    param.ds_zero_partition_group_name = groups.group_name
    param.ds_zero_placement_family = EXPERT_FAMILY


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoEBlock) for p in m.experts.parameters()]


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> None:
    """Shrink every MoE block's experts to this rank's block [lo, hi) and route tokens over the EP group."""
    if groups.ep_size == 1:
        return
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        lo, hi = groups.expert_range(block.num_experts)
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
            tag_expert_param(local, groups)
            setattr(experts, name, local)
        experts.num_experts = hi - lo
        experts.first_expert = lo
        block.dispatcher = AllToAllDispatcher(groups.ep_group, groups.ep_size, block.num_experts)


def check_expert_tags(model: nn.Module, groups: ParallelGroups) -> None:
    """Fail before training when an expert parameter lacks a tag that DeepSpeed would silently do without."""
    if groups.ep_size == 1:
        return
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        if not isinstance(block.dispatcher, AllToAllDispatcher):
            raise RuntimeError("ep_size > 1 but an MoE block still dispatches locally: call apply_expert_parallel "
                               "before building the engine")
        for name, p in block.experts.named_parameters():
            if getattr(p, "ds_zero_placement_family", None) != EXPERT_FAMILY or \
                    getattr(p, "ds_zero_partition_process_group", None) is not groups.edp_group or \
                    getattr(p, "allreduce", True) is not False:
                raise RuntimeError(f"expert parameter {name} is missing its expert-parallel DeepSpeed tags")


@torch.no_grad()
def gather_full_experts(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """All experts [E, ...] from each EP rank's block (for checks and export)."""
    import torch.distributed as dist  # noqa: PLC0415

    parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.ep_group)
    return torch.cat(parts)
