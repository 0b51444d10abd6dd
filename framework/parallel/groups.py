"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups.

Owns: checking ep_size against the world and the model, and creating the groups through DeepSpeed's groups API so
that the engine, its gradient reduction and its checkpoints know them. EP groups are consecutive ranks (inside a node
when ep_size <= GPUs per node: all-to-all stays on NVLink); EDP groups are strided: [0, ep, 2ep, ...], [1, ep+1, ...].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    ep_size: int
    ep_rank: int
    ep_group: object  # ProcessGroup for the token all-to-all
    edp_group: object  # ProcessGroup over which expert parameters are sharded / averaged
    group_name: str  # DeepSpeed's name for this EP size, "ep_size_{ep}"

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """The contiguous block of global expert ids this rank holds."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def init_parallel_groups(ep_size: int, num_experts: int) -> ParallelGroups:
    """Create (or look up) the EP/EDP groups; torch.distributed must be initialised (deepspeed.init_distributed)."""
    import deepspeed  # noqa: PLC0415 - deepspeed imports are slow; only distributed code needs it
    from deepspeed.utils import groups  # noqa: PLC0415

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call deepspeed.init_distributed() first")
    if not deepspeed.comm.is_initialized():  # a plain torch process group: DeepSpeed's groups API needs its wrapper
        from framework.cluster.process_group import init_deepspeed_distributed  # noqa: PLC0415

        init_deepspeed_distributed(dist.get_backend())
    from framework.config.plan import check_parallel  # noqa: PLC0415

    check_parallel(ep_size, dist.get_world_size(), num_experts)
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    return ParallelGroups(ep_size, dist.get_rank(group=ep_group), ep_group,
                          groups._get_expert_data_parallel_group(name), name)
