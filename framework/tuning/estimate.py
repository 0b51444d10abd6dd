"""Per-GPU memory estimate of a training run: parameters, gradients, optimizer states, activations, buffers.

Owns: what DeepSpeed 0.19.8 keeps where for our model under ZeRO-1/2/3 with expert parallelism (read from
runtime/zero/stage3.py, stage_1_and_2.py, partitioned_param_coordinator.py and torch's AdamW), the peak over the three
moments of a step (framework/tuning/activations.py), and the verdict against a GPU's memory. Estimates what
torch.cuda.max_memory_allocated reports; the CUDA context, NCCL's buffers and allocator fragmentation come on top,
which is why the verdict keeps 10% headroom. Pure arithmetic: no model, no process group, no DeepSpeed import.

ZeRO-3 (bf16, per rank): partitions of 2 (bf16 weights) + 2 (gradients, bf16 = DeepSpeed's default grad_accum_dtype)
+ 4 (fp32 master) + 8 (Adam m, v) bytes per element; dense tensors are partitioned over all N ranks, each rank's E/ep
experts over its EDP group (N/ep ranks), so both come to 1/N of the model. Parameters at or under
stage3_param_persistence_threshold (routers, norms) are also kept whole. One reduce bucket lives from start-up.
ZeRO-1/2: bf16 weights whole (experts: the rank's E/ep), fp32 master and Adam partitioned (dense over N, experts over
EDP), gradients whole (1) or partitioned (2), reduce buckets only during backward.
Optimizer step: per ZeRO-3 sub-group (sub_group_size elements, split per partition group) or per ZeRO-1/2 optimizer
group: under ZeRO-3 with bf16 gradients torch's AdamW steps in place from the gradient buffer (nothing allocated);
otherwise DeepSpeed makes an fp32 copy of the group's gradients (ZeRO-1/2: after a flattened bf16 one).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from framework.tuning.activations import BF16, CHECKPOINTING_MODES, FP32, ActivationPeaks, activation_peaks
from framework.tuning.params import ModelShape, ParamSpec, local_numel, model_shape, param_inventory

GIB = 2**30
USABLE_FRACTION = 0.9  # of the GPU's memory, for allocator fragmentation, the CUDA context and NCCL buffers
# DeepSpeed 0.19.8's defaults for ZeRO keys a JSON leaves out (deepspeed/runtime/zero/config.py).
DEEPSPEED_ZERO_DEFAULTS: dict[str, Any] = {
    "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5, "stage3_model_persistence_threshold": sys.maxsize,
    "stage3_max_live_parameters": 1e9, "sub_group_size": 1e9, "contiguous_gradients": True}
_ALIASES = {"prefetch_bucket_size": "stage3_prefetch_bucket_size",
            "param_persistence_threshold": "stage3_param_persistence_threshold",
            "model_persistence_threshold": "stage3_model_persistence_threshold",
            "max_live_parameters": "stage3_max_live_parameters"}
# deepspeed/moe/utils.py: ZeRO-1/2 expert parameter groups are cut into chunks of at most this many elements.
MOE_MAX_GROUP_SIZE = 178956971
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed settings memory depends on, resolved to numbers."""

    stage: int
    reduce_bucket_size: int
    prefetch_bucket_size: int
    param_persistence_threshold: int
    model_persistence_threshold: int
    max_live_parameters: int
    sub_group_size: int
    contiguous_gradients: bool
    overlap_comm: bool
    offload: bool
    torch_adam: bool  # torch's AdamW (stepped in place or fused: no temporaries); else DeepSpeed's CPU Adam
    grad_bytes: int  # ZeRO gradient storage: data_types.grad_accum_dtype, default the model's bf16
    comm_bytes: int  # communication_data_type, default bf16
    gradient_accumulation_steps: int = 1  # > 1: ZeRO-1/2 gradients outlive a micro batch's backward


def zero_settings(ds_config: dict[str, Any] | None, stage: int, offload: bool, hf_config=None,
                  ep_size: int = 1) -> ZeroSettings:
    """Resolve a DeepSpeed JSON (None: the framework's per-stage defaults, framework/config/deepspeed.py)."""
    from framework.config.deepspeed import ZERO_DEFAULTS, auto_sizes  # noqa: PLC0415

    if ds_config is None:
        zero = dict(ZERO_DEFAULTS[stage], stage=stage)
        if offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds_config = {"zero_optimization": zero, "optimizer": {"params": {"torch_adam": not offload}}}
    zero = dict(ds_config.get("zero_optimization", {}))
    given_stage = zero.get("stage", 0)
    given_offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if given_stage != stage:
        raise ValueError(f"ds_config zero_optimization.stage={given_stage} disagrees with zero_stage={stage}")
    if given_offload != offload:
        raise ValueError(f"ds_config zero_optimization.offload_optimizer disagrees with offload={offload}")
    for short, long in _ALIASES.items():
        if short in zero:
            zero.setdefault(long, zero.pop(short))
    sizes = auto_sizes(hf_config, ep_size)
    for key, value in list(zero.items()):
        if value == "auto":
            zero[key] = sizes["persistence" if "persistence" in key else "bucket"]
    merged = {**DEEPSPEED_ZERO_DEFAULTS, **zero}
    optimizer = (ds_config.get("optimizer") or {}).get("params", {})
    grad_dtype = (ds_config.get("data_types") or {}).get("grad_accum_dtype") or "bf16"
    return ZeroSettings(
        stage=stage, reduce_bucket_size=int(merged["reduce_bucket_size"]),
        prefetch_bucket_size=int(merged["stage3_prefetch_bucket_size"]),
        param_persistence_threshold=int(merged["stage3_param_persistence_threshold"]),
        model_persistence_threshold=int(merged["stage3_model_persistence_threshold"]),
        max_live_parameters=int(merged["stage3_max_live_parameters"]),
        sub_group_size=int(merged["sub_group_size"]), contiguous_gradients=bool(merged["contiguous_gradients"]),
        overlap_comm=bool(merged.get("overlap_comm", stage == 3)),  # DeepSpeed: on by default for stage 3 only
        offload=offload, torch_adam=bool(optimizer.get("torch_adam", not offload)),  # the framework's rule
        grad_bytes=_DTYPE_BYTES[str(grad_dtype)],
        comm_bytes=_DTYPE_BYTES[str(ds_config.get("communication_data_type") or "bf16")],
        gradient_accumulation_steps=int(ds_config.get("gradient_accumulation_steps", 1)))


# ---- what each rank holds ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroState:
    """Bytes per GPU (and per rank on the CPU) of ZeRO's own storage, by moment of the step."""

    parameters: int
    optimizer_states: int  # fp32 master + Adam m, v on the GPU (0 when offloaded)
    gradients: dict[str, int]  # by phase: loss, layer_backward, optimizer_step
    buffers: dict[str, int]  # reduce buckets, gathered / prefetched parameters, reduce-scatter staging
    step_temporaries: int  # the fp32 (and flattened bf16) gradient copies of the largest group stepped at once
    cpu: int  # per rank, with the optimizer offloaded
    optimizer_elements: int  # elements this rank's optimizer updates
    largest_step_group: int  # elements of the largest sub-group / group stepped at once


def _partition_groups(params: list[ParamSpec], num_gpus: int, ep_size: int, stage: int) -> list[list[int]]:
    """Per-rank optimizer elements of each parameter, grouped as DeepSpeed groups them for the optimizer step."""
    edp = num_gpus // ep_size
    if stage == 3:
        # stage3._get_trainable_parameter_groups: one group per partition process group (dense over the world,
        # experts over EDP when EP is on), then _create_fp16_sub_groups cuts each into sub-groups.
        groups: dict[bool, list[int]] = {}
        for p in params:
            expert = p.expert and ep_size > 1
            groups.setdefault(expert, []).append(math.ceil(local_numel(p, ep_size) / (edp if expert else num_gpus)))
        return list(groups.values())
    # One flat group of the dense tensors (all tensors without EP) over N ranks; with EP, moe/utils.py
    # split_params_into_different_moe_groups_for_optimizer puts expert tensors in chunks of <= 178,956,971 local
    # elements, each partitioned over EDP. ZeRO-0 partitions nothing.
    dense_count, expert_count = (1, 1) if stage == 0 else (num_gpus, edp)
    out = [[math.ceil(sum(p.numel for p in params if not (p.expert and ep_size > 1)) / dense_count)]]
    chunks: list[int] = []
    for n in (local_numel(p, ep_size) for p in params if p.expert and ep_size > 1):
        if not chunks or chunks[-1] + n > MOE_MAX_GROUP_SIZE:
            chunks.append(0)
        chunks[-1] += n
    return out + [[math.ceil(c / expert_count)] for c in chunks]


def _sub_groups(partitions: list[int], sub_group_size: int) -> list[int]:
    """stage3._create_fp16_sub_groups: add parameters until the sub-group reaches sub_group_size elements."""
    if sub_group_size >= sum(partitions):
        return [sum(partitions)]
    out, current = [], 0
    for i, n in enumerate(partitions):
        current += n
        if current >= sub_group_size or i == len(partitions) - 1:
            out.append(current)
            current = 0
    return out


def _zero3_modules(params: list[ParamSpec], ep_size: int, persistent: set[str]) -> list[int]:
    """Elements gathered per module fetch: each decoder layer is a ZeRO-3 leaf (attention, router and local experts
    at once, framework/zero/engine.py); outside the layers every module gathers its own non-persistent tensors."""
    modules: dict[str, int] = {}
    for p in params:
        if p.name in persistent:
            continue
        owner = p.name.rsplit(".", 1)[0]
        if ".layers." in p.name:
            owner = p.name[:p.name.index(".layers.") + len(".layers.")] + p.name.split(".layers.")[1].split(".")[0]
        modules[owner] = modules.get(owner, 0) + local_numel(p, ep_size)
    return list(modules.values())


def _persistent_params(params: list[ParamSpec], ep_size: int, z: ZeroSettings) -> set[str]:
    """parameter_offload.mark_persistent_parameters: small tensors stay gathered on every rank."""
    kept, total = set(), 0
    for p in params:
        n = local_numel(p, ep_size)
        if n + total > z.model_persistence_threshold:
            continue
        if n <= z.param_persistence_threshold:
            kept.add(p.name)
            total += n
    return kept


def zero3_state(params: list[ParamSpec], num_gpus: int, ep_size: int, z: ZeroSettings) -> ZeroState:
    groups = _partition_groups(params, num_gpus, ep_size, 3)
    part = sum(sum(g) for g in groups)
    persistent = _persistent_params(params, ep_size, z)
    whole = sum(local_numel(p, ep_size) for p in params if p.name in persistent)
    largest = max(n for g in groups for n in _sub_groups(g, z.sub_group_size))
    module = max(_zero3_modules(params, ep_size, persistent))
    # The fetch in hand plus prefetch of the next modules (stage3_prefetch_bucket_size), which stops once
    # stage3_max_live_parameters elements are gathered; the module in hand is fetched regardless. Parameters that
    # stage3_max_reuse_distance keeps gathered between uses are not modelled.
    gathered = BF16 * max(module, min(z.max_live_parameters, module + z.prefetch_bucket_size))
    bucket = z.comm_bytes * z.reduce_bucket_size if z.contiguous_gradients else 0  # stage3 IPG buffer, from init
    grads = 0 if z.offload else z.grad_bytes * part  # grad_partitions_flat_buffer (on the CPU when offloaded)
    # Backward: a leaf layer's full local gradients wait for the layer's backward hook; reduce_scatter_coalesced
    # concatenates a bucket's gradients into one more buffer before the reduce-scatter.
    backward = gathered + BF16 * module + z.comm_bytes * z.reduce_bucket_size
    # torch's AdamW steps a sub-group in place from its bf16 gradient slice (framework/zero/optimizer_step.py): no
    # temporary. Otherwise (fp32 gradients, or DeepSpeed's own Adam) the sub-group's fp32 gradient is made first.
    in_place = z.torch_adam and z.grad_bytes == BF16
    return ZeroState(
        parameters=BF16 * (part + whole), optimizer_states=0 if z.offload else 3 * FP32 * part,
        gradients={"loss": grads, "layer_backward": grads, "optimizer_step": grads},
        buffers={"loss": bucket + gathered, "layer_backward": bucket + backward, "optimizer_step": bucket},
        step_temporaries=0 if z.offload or in_place else FP32 * largest,
        cpu=_cpu_bytes(z, part, largest, grad_buffer=z.grad_bytes * part), optimizer_elements=part,
        largest_step_group=largest)


def zero12_state(params: list[ParamSpec], num_gpus: int, ep_size: int, z: ZeroSettings) -> ZeroState:
    """ZeRO-1/2; ZeRO-0 is estimated as ZeRO-1 with nothing partitioned (DeepSpeed's bf16 optimizer without ZeRO
    keeps the same fp32 master, Adam states and full gradients; its all-reduce buffers are taken as one bucket)."""
    groups = _partition_groups(params, num_gpus, ep_size, z.stage)
    part = sum(g[0] for g in groups)
    largest = max(g[0] for g in groups)
    whole = sum(local_numel(p, ep_size) for p in params)
    biggest = max(local_numel(p, ep_size) for p in params)
    if z.stage == 2:
        # grads_in_partition (bf16) from the first reduce until the step; gradients go to the CPU when offloaded
        grads = 0 if z.offload else BF16 * part
        in_flight = BF16 * biggest  # one tensor's full gradient, until its hook copies it into the bucket
    else:
        grads, in_flight = BF16 * whole, 0  # ZeRO-1 keeps every full gradient until the step
    # setup_buckets: one reduce buffer (two with overlap_comm) from the first gradient to the end of backward
    buckets = (2 if z.overlap_comm else 1) * BF16 * z.reduce_bucket_size if z.contiguous_gradients else 0
    offload_buffer = BF16 * biggest if z.offload else 0  # temp_grad_buffer_for_gpu_offload, from init
    # DeepSpeed flattens the group's bf16 gradient and converts it to fp32 before the step, which itself (torch's
    # fused AdamW, or framework/zero/optimizer_step.py's in-place one) allocates nothing
    flatten = BF16 + FP32
    return ZeroState(
        parameters=BF16 * whole, optimizer_states=0 if z.offload else 3 * FP32 * part,
        # zero_grad frees them after the step; with accumulation they carry over into the next micro batch
        gradients={"loss": grads if z.gradient_accumulation_steps > 1 else 0, "layer_backward": grads,
                   "optimizer_step": grads},
        buffers={"loss": offload_buffer, "layer_backward": offload_buffer + buckets + in_flight,
                 "optimizer_step": offload_buffer},
        step_temporaries=0 if z.offload else flatten * largest,
        cpu=_cpu_bytes(z, part, largest, grad_buffer=0), optimizer_elements=part, largest_step_group=largest)


def _cpu_bytes(z: ZeroSettings, part: int, largest: int, grad_buffer: int) -> int:
    """Offloaded: fp32 master, Adam m and v and fp32 gradients in (pinned) host memory; torch's AdamW on CPU tensors
    (single-tensor path) briefly holds sqrt(v) and sqrt(v) / bias_correction; DeepSpeed's CPU Adam works in place."""
    if not z.offload:
        return 0
    return 4 * FP32 * part + grad_buffer + (2 * FP32 * largest if z.torch_adam else 0)


# ---- the estimate ---------------------------------------------------------------------------------------------------
PHASES = ("loss", "layer_backward", "optimizer_step")
PHASE_TITLES = {"loss": "loss backward", "layer_backward": "layer backward", "optimizer_step": "optimizer step"}


@dataclass(frozen=True)
class Phase:
    """Bytes per GPU at one moment of the step."""

    name: str
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    buffers: int  # communication / prefetch
    optimizer_temporaries: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer_states + self.activations + self.buffers
                + self.optimizer_temporaries)


@dataclass(frozen=True)
class MemoryEstimate:
    num_gpus: int
    ep_size: int
    zero_stage: int
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool | str  # True, "moe", "attention" or False (train.activation_checkpointing)
    offload: bool
    attention: str
    shape: ModelShape
    num_params: int
    num_expert_params: int
    settings: ZeroSettings
    state: ZeroState
    activations: dict[bool | str, ActivationPeaks]  # for each activation checkpointing mode

    def phases(self, checkpointing: bool | str | None = None) -> list[Phase]:
        """The three moments of a step, with the configured activation checkpointing unless told otherwise."""
        acts = self.activations[self.activation_checkpointing if checkpointing is None else checkpointing]
        s = self.state
        return [Phase(name, s.parameters, s.gradients[name], s.optimizer_states, getattr(acts, name),
                      s.buffers[name], s.step_temporaries if name == "optimizer_step" else 0) for name in PHASES]

    def peak(self, checkpointing: bool | str | None = None) -> Phase:
        return max(self.phases(checkpointing), key=lambda p: p.total)

    @property
    def total_bytes(self) -> int:
        return self.peak().total

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def cpu_bytes_per_rank(self) -> int:
        return self.state.cpu

    def fits(self, gpu_memory_gb: float = 80.0, usable: float = USABLE_FRACTION) -> bool:
        return self.total_gib <= usable * gpu_memory_gb

    def verdict(self, gpu_memory_gb: float = 80.0, checkpointing: bool | str | None = None) -> str:
        need = self.peak(checkpointing).total / GIB
        if need <= USABLE_FRACTION * gpu_memory_gb:
            return f"fits ({gpu_memory_gb - need:.1f} GiB to spare)"
        if need <= gpu_memory_gb:
            return (f"tight: within {gpu_memory_gb:g} GiB but above {USABLE_FRACTION:.0%} of it (fragmentation, "
                    "the CUDA context and NCCL buffers come on top)")
        return f"does not fit ({need - gpu_memory_gb:.1f} GiB over)"


def estimate_memory(hf_config, num_gpus: int, ep_size: int = 1, zero_stage: int = 3, micro_batch_size: int = 1,
                    seq_len: int = 4096, activation_checkpointing: bool | str = True, offload: bool = False,
                    ds_config: dict[str, Any] | None = None, attention: str = "varlen",
                    loss_chunk_tokens: int = 0, z_loss: bool = False) -> MemoryEstimate:
    """Per-GPU memory of a bf16 training run of `hf_config` (a config of any registered family, a config.json dict or
    a checkpoint directory; model_type picks the family).

    `ds_config`: the run's DeepSpeed JSON (framework.config.deepspeed.build_ds_config); None: the framework's
    defaults for `zero_stage`. Its stage and offload_optimizer must agree with `zero_stage` and `offload`.
    `attention`: varlen (flash over packed documents), sdpa (with the [B,1,S,S] document mask) or eager.
    `z_loss`: the run's moe.z_loss_coef > 0."""
    from framework.config.plan import check_model_parallel  # noqa: PLC0415
    from framework.models.registry import family_for  # noqa: PLC0415

    config = family_for(hf_config).load_config(hf_config)
    _check_setup(num_gpus, zero_stage, offload, micro_batch_size, seq_len)
    check_model_parallel(ep_size, num_gpus, config)
    shape = model_shape(config)
    params = param_inventory(config)
    z = zero_settings(ds_config, zero_stage, offload, config, ep_size)
    state = (zero3_state if zero_stage == 3 else zero12_state)(params, num_gpus, ep_size, z)
    if activation_checkpointing not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}: expected true, false, moe or "
                         "attention")
    acts = {ac: activation_peaks(shape, micro_batch_size, seq_len, ac, attention, ep_size, loss_chunk_tokens, z_loss)
            for ac in CHECKPOINTING_MODES}
    return MemoryEstimate(
        num_gpus=num_gpus, ep_size=ep_size, zero_stage=zero_stage, micro_batch_size=micro_batch_size,
        seq_len=seq_len, activation_checkpointing=activation_checkpointing, offload=offload, attention=attention,
        shape=shape, num_params=sum(p.numel for p in params),
        num_expert_params=sum(p.numel for p in params if p.expert), settings=z, state=state,
        activations=acts)


def _check_setup(num_gpus: int, zero_stage: int, offload: bool, micro_batch_size: int, seq_len: int) -> None:
    if num_gpus < 1:
        raise ValueError(f"num_gpus ({num_gpus}) must be >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage ({zero_stage}) must be 0, 1, 2 or 3")
    if offload and zero_stage == 0:
        raise ValueError("offload needs ZeRO stage 1, 2 or 3 (stage 0 has no optimizer partitions to offload)")
    if micro_batch_size < 1 or seq_len < 1:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and seq_len ({seq_len}) must be >= 1")

