"""One rank of the MoE-block expert-parallel runs with forced routing (started by test_ep_block.py).

    python tests/distributed/ep_block_worker.py OUT_DIR

Case "remote": rank 0's tokens all go to experts it does not hold, and rank 1's all to rank 0's experts.
Case "starved": every rank's tokens go to the last rank's experts; the other ranks receive no rows at all.
Each case runs with the tokens in 1, 2 and 3 pipelined chunks (`chunks`; 3 chunks of 6 tokens leave the starved
ranks' chunks empty too). Rank 0 writes, per (case, chunks), every rank's output and input gradient, the summed router gradient and the full expert
gradients to OUT_DIR/block.pt.
"""

from __future__ import annotations

import gc
import os
import sys

if __name__ == "__main__":
    # The imports below (torch and what the framework pulls in) allocate ~400k long-lived objects and no garbage:
    # collecting while they load only walks them again and again (~0.4 s of each rank's start-up).
    gc.disable()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from framework.parallel.expert_parallel import expert_placement, gather_full_experts  # noqa: E402
from framework.parallel.groups import init_parallel_groups  # noqa: E402
from tests.distributed.block_case import E, case_inputs, make_block  # noqa: E402
from framework.cluster.process_exit import exit_without_teardown  # noqa: E402

if __name__ == "__main__":
    # frozen, the import-time objects are skipped by every later collection; collection is back on for the
    # runs themselves
    gc.freeze()
    gc.enable()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = init_parallel_groups(world, E)
    results = {}
    for case, chunks in [(c, n) for c in ("remote", "starved") for n in (1, 2, 3)]:
        block = make_block(expert_placement(groups, chunks=chunks))
        xs, dys = case_inputs(case, world)
        x = xs[rank].clone().requires_grad_()
        y, stats = block(x)
        (y * dys[rank]).sum().backward()
        gate_grad = block.gate.weight.grad.clone()
        dist.all_reduce(gate_grad)
        results[case, chunks] = {"y": gather_rows(y.detach()), "x_grad": gather_rows(x.grad), "gate_grad": gate_grad,
                         "gate_up_grad": gather_full_experts(block.experts.gate_up_proj.grad, groups),
                         "down_grad": gather_full_experts(block.experts.down_proj.grad, groups),
                         "local_rows": torch.tensor(float(block.experts.gate_up_proj.shape[0]))}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "block.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
