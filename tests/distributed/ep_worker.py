"""One rank of the expert-parallel parity runs (started by test_ep_zero.py with RANK/WORLD_SIZE/MASTER_* set).

    python tests/distributed/ep_worker.py RUN [+ RUN ...]
    RUN = OUT_DIR EP_SIZE STAGE [STAGE ...] [tied] [family=F] [chunks=C] [gas=G] [bucket_only]

Runs one after another in the same processes (one launch for many settings: each launch costs ~5 s of start-up on a
2-core CPU machine). For each ZeRO stage of a run: a tiny Qwen3-MoE (with `tied`: tied word embeddings), EP over the given size (its all-to-alls
pipelined in C token chunks, parallel.ep_chunks), 3 AdamW steps with clipping on a fixed global batch, each rank's
share of it in G accumulated micro batches; rank 0 writes losses, the step-0 full gradients, the global grad norms,
the final full parameters and how many ZeRO-3 gradients went straight to their partitions
(framework/zero/local_grads.py; none with `bucket_only`, which keeps DeepSpeed's reduce bucket for all) to
OUT_DIR/stage{S}.pt.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, Callable

if __name__ == "__main__":
    # The imports below (torch and what the framework pulls in) allocate ~400k long-lived objects and no garbage:
    # collecting while they load only walks them again and again (~0.4 s of each rank's start-up).
    gc.disable()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

import framework  # noqa: E402
from framework.cluster.process_group import init_deepspeed_distributed  # noqa: E402
from framework.models.registry import family_for, moe_shape  # noqa: E402
from framework.parallel.expert_parallel import expert_placement, gather_full_experts  # noqa: E402
from framework.parallel.groups import init_parallel_groups  # noqa: E402
from framework.zero import local_grads  # noqa: E402
from framework.zero.engine import initialize  # noqa: E402
from tests.distributed.common import MICRO, STEPS, ds_config, global_batch, model_config  # noqa: E402
from tests.distributed.launch import split_runs  # noqa: E402
from framework.cluster.process_exit import exit_without_teardown  # noqa: E402

if __name__ == "__main__":
    # frozen, the import-time objects are skipped by every later collection; collection is back on for the
    # runs themselves
    gc.freeze()
    gc.enable()


def full_tensors(engine, groups, read) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():
        t = read(p).detach().float().clone()
        if getattr(p, "ds_zero_placement_family", None) is not None:
            t = gather_full_experts(t, groups)
        out[name] = t
    return out


class StraightGrads:
    """Records local_grads' decision for every ZeRO-3 gradient (forced to DeepSpeed's bucket while `bucket_only`).
    Installed once per process: the runs of one launch share it, each setting `bucket_only` and clearing `decisions`."""

    def __init__(self):
        self.decisions: list[bool] = []
        self.bucket_only = False
        decide = local_grads._goes_straight

        def recorded(optimizer, param) -> bool:
            self.decisions.append(False if self.bucket_only else decide(optimizer, param))
            return self.decisions[-1]

        local_grads._goes_straight = recorded


def train_and_record(engine, groups, micro_forwards: list[Callable[[], Any]], steps: int) -> dict:
    """`steps` optimizer steps, each accumulating the losses of `micro_forwards()`; records the loss averaged over
    micro batches and ranks, the global grad norm, the full gradients of the first step and the full fp32 parameters
    at the end."""
    world = dist.get_world_size()
    result = {"losses": [], "norms": []}
    for step in range(steps):
        loss = torch.zeros(())
        for i, forward in enumerate(micro_forwards):
            out = forward()
            engine.backward(out.loss)
            if step == 0 and i == len(micro_forwards) - 1:
                result["grads"] = full_tensors(engine, groups, safe_get_full_grad)
            engine.step()  # DeepSpeed steps at the accumulation boundary only
            loss += out.loss.detach().float() / len(micro_forwards)
        dist.all_reduce(loss)
        result["losses"].append(loss.item() / world)
        result["norms"].append(float(engine.get_global_grad_norm()))
    result["params"] = full_tensors(engine, groups, safe_get_full_fp32_param)
    # the clipping factor went to torch's fused AdamW instead of a separate pass (framework/zero/optimizer_step.py)
    result["grad_scale"] = getattr(engine.optimizer.optimizer, "grad_scale", None)
    return result


def run(stage: int, ep: int, out_dir: str, tied: bool = False, family: str | None = None, chunks: int = 1,
        gas: int = 1, decisions: list[bool] | None = None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = model_config(tied, family)
    groups = init_parallel_groups(ep, moe_shape(family_for(config).load_config(config))[1])
    # Experts are sliced on the meta device: each rank allocates and initialises only its own block.
    model = framework.load_model(config, backend="grouped_mm", attn_implementation="eager", seed=0,
                                 placement=expert_placement(groups, stage, chunks))
    micro = MICRO // gas
    engine, *_ = initialize(model, dict(ds_config(stage, world), train_micro_batch_size_per_gpu=micro,
                                        gradient_accumulation_steps=gas), groups)
    ids, mask, labels = global_batch(world, vocab_size=config["vocab_size"])

    def forward(i: int):
        sl = slice(rank * MICRO + i * micro, rank * MICRO + (i + 1) * micro)
        return lambda: engine(ids[sl], attention_mask=mask[sl], labels=labels[sl])

    if decisions is not None:
        decisions.clear()
    result = train_and_record(engine, groups, [forward(i) for i in range(gas)], STEPS)
    result["straight_grads"] = sum(decisions or [])
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"stage{stage}.pt"))
    engine.destroy() if hasattr(engine, "destroy") else None


def main() -> None:
    straight = StraightGrads()
    init_deepspeed_distributed("gloo")
    for args in split_runs(sys.argv[1:]):
        out_dir, ep, rest = args[0], int(args[1]), args[2:]
        tied = "tied" in rest
        family = next((a.split("=", 1)[1] for a in rest if a.startswith("family=")), None)
        chunks = int(next((a.split("=", 1)[1] for a in rest if a.startswith("chunks=")), 1))
        gas = int(next((a.split("=", 1)[1] for a in rest if a.startswith("gas=")), 1))
        straight.bucket_only = "bucket_only" in rest
        for stage in (int(s) for s in rest if s.isdigit()):
            run(stage, ep, out_dir, tied, family, chunks, gas, straight.decisions)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
