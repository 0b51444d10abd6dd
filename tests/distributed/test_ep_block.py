"""The MoE block under EP=2 (2 gloo processes) with forced, lopsided routing equals one process holding all experts:
outputs, input gradients, router gradient, expert gradients, with the tokens in 1, 2 or 3 pipelined chunks
(parallel.ep_chunks). Nobody hangs when a rank sends or receives nothing."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.block_case import make_block, case_inputs
from tests.distributed.launch import run_workers
from tests.helpers import rel_err

pytestmark = pytest.mark.slow
WORLD = 2


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_block")
    run_workers(os.path.join(os.path.dirname(__file__), "ep_block_worker.py"), [str(out)], world=WORLD,
                timeout=300)
    return torch.load(out / "block.pt")


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("case", ["remote", "starved"])
def test_forced_routing_matches_single_process(ep_results, case, chunks):
    block = make_block()
    xs, dys = case_inputs(case, WORLD)
    x = torch.cat(xs).requires_grad_()
    y, stats = block(x)
    (y * torch.cat(dys)).sum().backward()
    if case == "remote":
        assert stats.tokens_per_expert[:4].sum() > 0 and stats.tokens_per_expert[4:].sum() > 0
    else:
        assert stats.tokens_per_expert[:4].sum() == 0  # rank 0 holds experts 0-3 and receives no rows
    got = ep_results[case, chunks]
    assert rel_err(got["y"], y.detach().reshape(-1, *y.shape[2:]).view_as(got["y"])) <= 1e-5
    assert rel_err(got["x_grad"], x.grad.view_as(got["x_grad"])) <= 1e-5
    assert rel_err(got["gate_grad"], block.gate.weight.grad) <= 1e-5
    assert rel_err(got["gate_up_grad"], block.experts.gate_up_proj.grad) <= 1e-5
    assert rel_err(got["down_grad"], block.experts.down_proj.grad) <= 1e-5
    assert got["local_rows"].item() == 8 // WORLD  # each rank really held only its block of experts
