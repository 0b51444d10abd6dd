"""MoE blocks presented to DeepSpeed's ZeRO-1/2 as DeepSpeed MoE layers, from construction on.

DeepSpeed 0.19.8's engine finds expert parameters for ZeRO-1/2 by `isinstance(module, deepspeed.moe.layer.MoE)`
(engine.py: the expert data-parallel groups of the optimizer, expert checkpoint files on save and load) and reads
`num_experts`, `num_local_experts`, `ep_size` and `expert_group_name` from it. The placement for such a run builds
every MoE block as a subclass of the base made here (framework/moe/placement.py `block_base`), so a block is that
MoE layer the moment it exists; ZeRO-3 takes its expert groups from parameter tags instead and needs none of this.
"""

from __future__ import annotations

import functools

from torch import nn

from framework.parallel.groups import ParallelGroups


@functools.cache
def _base(ep_size: int, group_name: str) -> type:
    from deepspeed.moe.layer import MoE  # noqa: PLC0415

    class DeepSpeedMoEBase(MoE):
        """Answers DeepSpeed's questions about an MoE block; holds no experts of its own (MoEBlock's are used)."""

        def __init__(self):
            # MoE.__init__ would build DeepSpeed's own gate and experts; the block builds ours
            nn.Module.__init__(self)

        @property
        def num_local_experts(self) -> int:
            return self.experts.num_experts

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            """The EP groups are ours (framework/parallel/groups.py), registered with DeepSpeed under the name above."""

    DeepSpeedMoEBase.ep_size = ep_size
    DeepSpeedMoEBase.expert_group_name = group_name
    return DeepSpeedMoEBase


def deepspeed_moe_base(groups: ParallelGroups) -> type:
    """The base class that makes MoE blocks DeepSpeed MoE layers of this EP group (one class per group)."""
    return _base(groups.ep_size, groups.group_name)
