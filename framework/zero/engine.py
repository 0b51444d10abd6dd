"""deepspeed.initialize for our MoE models (every family) with expert parallelism: config checks, MoE-aware ZeRO setup.

Owns: everything DeepSpeed-specific about MoE: rejecting ZeRO options that cannot work with expert partition groups,
tagging expert parameters for per-parameter partition groups, making each decoder layer a ZeRO-3 leaf module (its
parameters gathered and reduced as a unit: ranks that route to different experts never issue mismatched collectives,
and one fetch and one reduction per layer replace DeepSpeed's hooks on each of its ~10 submodules), and, for
ZeRO-1/2, checking that the MoE blocks were built as DeepSpeed MoE layers (framework/zero/deepspeed_moe.py: the only
way the stage-1/2 optimizer shards expert states over the EDP group and reduces expert gradients there). The
optimizer step's passes are framework/zero/optimizer_step.py's; gradients of one-rank partitions skip ZeRO-3's reduce
bucket (framework/zero/local_grads.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from framework.models.decoder import DecoderLayer  # every family's layer class (Architecture varies it)
from framework.moe.layer import MoEBlock
from framework.parallel.ep_dispatch import AllToAllDispatcher
from framework.parallel.groups import ParallelGroups
from framework.zero import local_grads, optimizer_step

# DeepSpeed's AutoEP family tag: stage3.py averages these gradients over the whole DP world (each EP rank's expert
# gradient already holds every EP peer's tokens) and adds an all-reduce over the EP group to the gradient norm.
EXPERT_FAMILY = "autoep_expert"


def _tag_expert_param(param: nn.Parameter, groups: ParallelGroups) -> None:
    param.allreduce = False  # engine._broadcast_model: broadcast inside the EDP group only
    param.group_name = groups.group_name
    param.ds_zero_partition_process_group = groups.edp_group  # zero.Init: shard over EDP, not the world
    param.ds_zero_partition_group_name = groups.group_name
    param.ds_zero_placement_family = EXPERT_FAMILY


def tag_expert_params(model: nn.Module, groups: ParallelGroups) -> None:
    """Tag every expert-parallel parameter for DeepSpeed. Must run after the model is materialised (to_empty and
    dtype casts make new Parameter objects) and before deepspeed.initialize converts it. Without these tags DeepSpeed
    fails silently (measured): rank 0's experts broadcast over the others, or expert gradients exactly ep x too large.
    """
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        if isinstance(block.dispatcher, AllToAllDispatcher):
            for p in block.experts.parameters():
                _tag_expert_param(p, groups)


def check_expert_tags(model: nn.Module, groups: ParallelGroups) -> None:
    """Fail before training when an expert parameter lacks a tag that DeepSpeed would silently do without (DeepSpeed
    checks nothing for custom MoE modules)."""
    if groups.ep_size == 1:
        return
    for block in (m for m in model.modules() if isinstance(m, MoEBlock)):
        if not isinstance(block.dispatcher, AllToAllDispatcher):
            raise RuntimeError("ep_size > 1 but an MoE block still dispatches locally: build the model with "
                               "load_model(..., placement=expert_placement(groups))")
        for name, p in block.experts.named_parameters():
            if getattr(p, "ds_zero_placement_family", None) != EXPERT_FAMILY or \
                    getattr(p, "ds_zero_partition_process_group", None) is not groups.edp_group or \
                    getattr(p, "allreduce", True) is not False:
                raise RuntimeError(f"expert parameter {name} is missing its expert-parallel DeepSpeed tags")


def check_ds_config(ds_config: dict[str, Any], ep_size: int, source: str = "DeepSpeed config") -> None:
    """One-line errors for settings that cannot be combined with expert parallelism."""
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if ep_size > 1:
        if zero.get("zero_hpz_partition_size", 1) > 1:
            raise ValueError(f"{source}: zero_optimization.zero_hpz_partition_size="
                             f"{zero['zero_hpz_partition_size']} (hpZ) cannot be combined with expert parallelism "
                             f"(parallel.ep_size={ep_size}); set it to 1")
        for key in ("zero_quantized_gradients", "zero_quantized_weights"):
            if zero.get(key):
                raise ValueError(f"{source}: zero_optimization.{key}=true cannot be combined with expert parallelism "
                                 f"(parallel.ep_size={ep_size}); set it to false")
        if ds_config.get("sequence_parallel_size", 1) > 1:
            raise ValueError(f"{source}: sequence_parallel_size={ds_config['sequence_parallel_size']} cannot be "
                             f"combined with expert parallelism (parallel.ep_size={ep_size}); set it to 1")
        if stage in (1, 2):
            for key in ("contiguous_gradients", "reduce_scatter"):
                if zero.get(key, True) is False:
                    raise ValueError(f"{source}: zero_optimization.{key}=false; ZeRO-{stage} with expert "
                                     "parallelism needs it true")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage={stage}; expected 0, 1, 2 or 3")


def check_deepspeed_moe_blocks(model: nn.Module, groups: ParallelGroups, stage: int) -> None:
    """ZeRO-1/2 with ep_size > 1 handles expert parameters only inside DeepSpeed MoE layers; everywhere else the
    blocks must not be ones (ZeRO-3 would take DeepSpeed's own MoE paths beside our parameter tags). Fail before
    training when the blocks were built for the other case."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: PLC0415

    wanted = stage < 3 and groups.ep_size > 1
    for name, block in ((n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)):
        built = isinstance(block, DeepSpeedMoE)
        if built == wanted and (not built or block.expert_group_name == groups.group_name):
            continue
        what = ("is built as a DeepSpeed MoE layer, which only ZeRO-1/2 with ep_size > 1 takes" if built and not wanted
                else "is not built as a DeepSpeed MoE layer of this EP group, where ZeRO-1/2 finds expert parameters")
        raise RuntimeError(f"ZeRO stage {stage} with ep_size {groups.ep_size}: MoE block {name} {what}; build the "
                           f"model with load_model(..., placement=expert_placement(groups, zero_stage={stage}))")


def initialize(model: nn.Module, ds_config: dict[str, Any], groups: ParallelGroups, **kwargs):
    """deepspeed.initialize with the MoE plumbing; returns what deepspeed.initialize returns."""
    import deepspeed  # noqa: PLC0415
    from deepspeed.utils import set_z3_leaf_modules  # noqa: PLC0415

    check_ds_config(ds_config, groups.ep_size)
    optimizer_step.install()
    local_grads.install()
    tag_expert_params(model, groups)
    check_expert_tags(model, groups)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    check_deepspeed_moe_blocks(model, groups, stage)
    if stage == 3:
        set_z3_leaf_modules(model, [DecoderLayer])
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config, **kwargs)


def set_hyperparameters(engine, lr: float, schedule, step: int, betas: tuple[float, float], eps: float,
                        weight_decay: float, grad_clip: float) -> None:
    """Put this run's optimizer settings on a resumed engine, with the lr schedule evaluated at `step` (optimizer
    steps done). DeepSpeed's load restores the saved param groups (lr, betas, eps, weight decay) and, for ZeRO-1/2,
    the saved clipping norm: without this a changed setting on resume would be silently ignored."""
    opt = engine.optimizer
    for group in opt.param_groups:
        group.update(lr=lr * schedule(step), initial_lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if hasattr(opt, "clip_grad"):
        opt.clip_grad = grad_clip
    sched = engine.lr_scheduler
    if sched is not None:
        sched.base_lrs = [lr] * len(opt.param_groups)
        sched.last_epoch = step
        sched._last_lr = [g["lr"] for g in opt.param_groups]
