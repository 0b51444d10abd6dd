"""Step time of a multi-node plan from measured rates: the time side of `tools/tune_zero.py` (issue #19, item 4).

Legend: N nodes of G GPUs, W = N*G ranks, EP expert-parallel size (inside a node), EDP = W/EP (the ranks that hold
the same experts), Tm = micro batch x seq tokens per rank, K top-k, E experts, H hidden, Pd dense parameters, Pe
expert parameters one rank holds (E/EP experts' worth).
Model, per optimizer step, per rank:

    step = micro steps x (compute + exposed all-to-all + exposed ZeRO-3 gathers) + exposed gradient traffic

- compute: model FLOPs (framework/train/flops.py) / the TFLOP/s one GPU reaches on the same micro batch and
  checkpointing without communication (`benchmarks/e2e.py --num_gpus 1`). That rate includes the layers, the loss,
  the host and the optimizer step of all parameters; on W ranks each steps 1/W of them, so at mbs 1 it overstates
  the compute by a few percent.
- all-to-all: each token goes once to each distinct rank among its K experts' ranks (PERF_NOTES change 7), for
  dispatch and combine, in the forward, the backward and a recomputed forward. With uniform routing, a token's K
  distinct experts fall on EP * (1 - C(E - E/EP, K) / C(E, K)) ranks, all but a 1/EP share remote. bf16 rows of H.
- ZeRO traffic in bf16, ring collectives (each rank sends (n-1)/n of the tensor): gradients reduce-scattered every
  micro step under ZeRO-2 and ZeRO-3 (DeepSpeed reduces each backward), dense over W and experts over EDP; ZeRO-2
  all-gathers the updated parameters once per step; ZeRO-3 all-gathers every parameter in each forward and each
  backward of every micro step, and again where checkpointing recomputes part of a layer (a decoder layer is one
  ZeRO-3 leaf module, PERF_NOTES change 11: the embeddings and LM head are counted the same, a small overstatement).
- bandwidth: a collective whose group stays inside a node runs at `intra_gbs`, one that spans nodes at `inter_gbs`
  (per-GPU bus bandwidth: with a NIC per GPU, the NIC's; benchmarks/collectives.py measures both on a cluster). The
  dense group spans nodes whenever N > 1, the expert group whenever N > 1 too (an EP block stays inside its node, so
  its EDP peers are on other nodes).
- overlap: `a2a_hidden` and `zero_hidden` are the shares hidden behind compute (0 = nothing hidden, an upper
  bound on the step). The measured 2- and 4-GPU profiles are what should set them (PERF_NOTES Next 1).
Not modelled: load imbalance between EP ranks (the slowest rank paces every all-to-all), the pipeline bubbles of
prefetching, NCCL's latency at small messages, stragglers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.tuning.params import ParamSpec, local_numel

BF16 = 2


@dataclass(frozen=True)
class Rates:
    """Measured speeds a plan's step time is built from."""

    compute_tflops: float  # model TFLOP/s of one GPU on this micro batch and checkpointing, no communication
    intra_gbs: float  # per-GPU bus bandwidth of a collective inside a node, GB/s
    inter_gbs: float  # per-GPU bus bandwidth of a collective across nodes, GB/s
    a2a_hidden: float = 0.0  # share of the all-to-all hidden behind compute
    zero_hidden: float = 0.0  # share of ZeRO's gathers and reductions hidden behind compute


@dataclass(frozen=True)
class Plan:
    nodes: int
    gpus_per_node: int
    ep_size: int
    zero_stage: int  # 2 or 3
    micro_batch_size: int
    seq_len: int
    micro_steps: int = 1  # gradient accumulation
    checkpointing: bool | str = True  # train.activation_checkpointing: True (whole layers), "moe", "attention", False

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def recomputes_moe(self) -> bool:
        """The backward runs the MoE half's forward again, all-to-alls included."""
        return self.checkpointing in (True, "moe")

    @property
    def recomputes(self) -> bool:
        """The backward runs part of each layer's forward again: under ZeRO-3 the layer (one leaf module) is gathered
        a third time."""
        return self.checkpointing is not False


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on one rank, by cause."""

    compute: float
    all_to_all: float  # exposed
    zero: float  # exposed
    all_to_all_bytes: int  # sent per rank per step
    zero_bytes: int

    @property
    def total(self) -> float:
        return self.compute + self.all_to_all + self.zero


def distinct_ranks(num_experts: int, top_k: int, ep_size: int) -> float:
    """Expected number of EP ranks among a token's K distinct experts, uniform routing."""
    others = num_experts - num_experts // ep_size
    return ep_size * (1.0 - math.comb(others, top_k) / math.comb(num_experts, top_k))


def all_to_all_bytes(plan: Plan, hidden: int, num_moe_layers: int, num_experts: int, top_k: int) -> int:
    """Bytes one rank sends to other ranks in one micro step's all-to-alls."""
    if plan.ep_size == 1:
        return 0
    rows = plan.micro_batch_size * plan.seq_len * distinct_ranks(num_experts, top_k, plan.ep_size)
    remote = rows * (plan.ep_size - 1) / plan.ep_size
    passes = 3 if plan.recomputes_moe else 2  # forward, backward, recomputed forward
    return int(num_moe_layers * passes * 2 * remote * hidden * BF16)  # x2: dispatch and combine


def _ring(numel: int, ranks: int) -> float:
    """bf16 bytes one rank sends in a ring all-gather or reduce-scatter of `numel` elements over `ranks`."""
    return BF16 * numel * (ranks - 1) / ranks


def zero_bytes(plan: Plan, params: list[ParamSpec]) -> tuple[float, float, float, float]:
    """(per micro step over the dense group, per micro step over the expert group, per step over the dense group,
    per step over the expert group): bytes one rank sends for ZeRO's gathers and reductions."""
    world, edp = plan.world, plan.world // plan.ep_size
    dense = sum(p.numel for p in params if not p.expert)
    expert = sum(local_numel(p, plan.ep_size) for p in params if p.expert)
    if plan.zero_stage == 3:
        gathers = 3 if plan.recomputes else 2  # forward, backward (and a recomputed forward)
        return ((gathers + 1) * _ring(dense, world), (gathers + 1) * _ring(expert, edp), 0.0, 0.0)
    if plan.zero_stage == 2:
        return (_ring(dense, world), _ring(expert, edp), _ring(dense, world), _ring(expert, edp))
    raise ValueError(f"zero_stage {plan.zero_stage}: the time model covers ZeRO-2 and ZeRO-3")


def _spans_nodes(plan: Plan, expert_group: bool) -> bool:
    """Whether the dense group (all ranks) or the expert group (ranks r, r + EP, ...: one per EP block, and an EP
    block never leaves its node) has ranks on more than one node."""
    if plan.nodes == 1:
        return False
    return not expert_group or plan.world // plan.ep_size > 1


def step_time(plan: Plan, rates: Rates, flops_per_token: float, hidden: int, num_moe_layers: int, num_experts: int,
              top_k: int, params: list[ParamSpec]) -> StepTime:
    """The modelled step of `plan` (see the module doc)."""
    if plan.ep_size > plan.gpus_per_node:
        raise ValueError(f"ep_size {plan.ep_size} > {plan.gpus_per_node} GPUs per node: the model keeps the expert "
                         "all-to-all inside a node")
    if plan.world % plan.ep_size:
        raise ValueError(f"ep_size {plan.ep_size} does not divide {plan.world} GPUs")
    tokens = plan.micro_batch_size * plan.seq_len
    compute = plan.micro_steps * flops_per_token * tokens / (rates.compute_tflops * 1e12)
    a2a = plan.micro_steps * all_to_all_bytes(plan, hidden, num_moe_layers, num_experts, top_k)
    a2a_s = a2a / (rates.intra_gbs * 1e9) * (1 - rates.a2a_hidden)
    dense_micro, expert_micro, dense_step, expert_step = zero_bytes(plan, params)
    dense_bw = rates.inter_gbs if _spans_nodes(plan, False) else rates.intra_gbs
    expert_bw = rates.inter_gbs if _spans_nodes(plan, True) else rates.intra_gbs
    dense_total = plan.micro_steps * dense_micro + dense_step
    expert_total = plan.micro_steps * expert_micro + expert_step
    zero_s = (dense_total / (dense_bw * 1e9) + expert_total / (expert_bw * 1e9)) * (1 - rates.zero_hidden)
    return StepTime(compute, a2a_s, zero_s, int(a2a), int(dense_total + expert_total))
