"""One rank of the auxiliary-loss-free balancing check (started by test_families_train.py with RANK/WORLD_SIZE/
MASTER_* set): every rank routes its own tokens through the same tiny DeepSeek-V3 model for a few steps, updating the
selection biases with RouterBiasBalancer (framework/moe/bias_balancing.py); afterwards the biases must be identical on
every rank and equal the rule applied by hand to the sum of every rank's counts. Rank 0 writes OUT/bias.pt.

    python tests/distributed/bias_worker.py OUT
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

import framework  # noqa: E402
from framework.moe.bias_balancing import RouterBiasBalancer  # noqa: E402
from tests.helpers import TINY_DEEPSEEK_RUN  # noqa: E402
from framework.cluster.process_exit import exit_without_teardown  # noqa: E402

if __name__ == "__main__":
    # frozen, the import-time objects are skipped by every later collection; collection is back on for the
    # runs themselves
    gc.freeze()
    gc.enable()

RATE, STEPS, MICRO_BATCHES = 0.01, 3, 2


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = framework.load_model(dict(TINY_DEEPSEEK_RUN), backend="eager", router_bias_update_rate=RATE, seed=0)
    balancer = RouterBiasBalancer(model, RATE)
    expected = [torch.zeros_like(b) for b in balancer.biases]
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    with torch.no_grad():
        for _ in range(STEPS):
            local = None
            for _ in range(MICRO_BATCHES):
                ids = torch.randint(0, TINY_DEEPSEEK_RUN["vocab_size"], (2, 16), generator=g)
                stats = model(ids).router_stats
                balancer.accumulate(stats)
                counts = torch.stack([s.tokens_per_expert for s in stats])
                local = counts if local is None else local + counts
            everyone = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(everyone, local)
            total = torch.stack(everyone).sum(0)
            for e, load in zip(expected, total):
                e += RATE * torch.sign(load.mean() - load)  # the rule, by hand, on the global load
            balancer.step()
    mine = torch.stack(balancer.biases)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(b, gathered[0]) for b in gathered), "biases differ between ranks"
    assert torch.equal(mine, torch.stack(expected)), (mine, expected)
    assert mine.abs().sum() > 0
    if rank == 0:
        torch.save(gathered, os.path.join(out, "bias.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown(0)
