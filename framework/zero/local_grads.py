"""ZeRO-3 gradients whose partition group is one rank go straight into their gradient partition.

DeepSpeed 0.19.8's ZeRO-3 (stage3.py) sends every gradient through its reduce bucket: a copy into the bucket
(`__add_grad_to_ipg_bucket`), a division of the bucket by the averaging world size and an all-reduce
(`__avg_scatter_contiguous_grads`), then a copy of each slice into the parameter's gradient partition
(`partition_grads`). When the parameter's partition group has one rank, the all-reduce does nothing and the partition
is the whole gradient, so the bucket costs two extra passes over the gradient (2 + 2 and 2 + 2 bytes per element)
and the launches of each. That is every parameter on one GPU, and every expert under expert parallelism with
ep_size == world size (an EDP group of one), which is most of an MoE model's parameters. Here such a gradient is
divided by the averaging world size (1 on one GPU; the data-parallel world for our experts, which DeepSpeed averages
over the whole world: framework/zero/engine.py's EXPERT_FAMILY tag) into its partition in one pass, as DeepSpeed's
division would round it, or added to it when gradients accumulate over micro batches.

Everything else (other partition groups, offloaded gradients, a communication or accumulation dtype other than the
gradient's, gradient pre-division, sequence parallelism, ZenFlow, AutoEP's tensor-parallel folding) keeps DeepSpeed's
path. `install()` replaces the one method DeepSpeed's gradient hook calls, once per process, before any engine exists
(framework/zero/engine.initialize calls it).
"""

from __future__ import annotations

import torch

from framework.zero.method_patch import replace_method

# DeepSpeed's private map from parameter id to its slice of grad_partitions_flat_buffer (name-mangled in stage3.py)
_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


def _goes_straight(self, param) -> bool:
    grad = param.grad
    return (grad is not None and not self.offload_optimizer and not getattr(self, "zenflow", False)
            and getattr(self, "autoep_folding_spec", None) is None
            and getattr(self, "sequence_parallel_size", 1) == 1
            and not (self.postscale_gradients and self.gradient_predivide_factor != 1.0)
            and grad.dtype == self.get_param_comm_dtype(param) == self.gradient_accumulation_dtype
            and self._get_param_partition_world_size(param) == 1
            and grad.numel() == param.partition_numel())


def _reduce_or_place(original, self, param) -> None:
    if not _goes_straight(self, param):
        return original(self, param)
    if not getattr(param, "ds_grad_is_ready", True):  # a transient gradient DeepSpeed also leaves alone
        return None
    partition = getattr(self, _PARTITIONS)[param.ds_id]
    grad = param.grad.reshape(-1)
    averaging = self._gradient_averaging_world_size([param], 1)
    if self.micro_step_id == 0:  # the first micro batch since the step: overwrite, as partition_grads does
        if averaging == 1:
            partition.copy_(grad)
        else:
            torch.div(grad, averaging, out=partition)
    else:
        partition.add_(grad if averaging == 1 else grad.div(averaging))
    param.grad = None
    return None


def install() -> None:
    """Route one-rank partitions' gradients straight to their partitions for this process (idempotent)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Zero3  # noqa: PLC0415

    replace_method(Zero3, "reduce_independent_p_g_buckets_and_remove_grads", _reduce_or_place)
