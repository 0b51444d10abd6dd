"""benchmarks/layer_host.py cuts the MoE layer's step into stages by calling its pieces itself; this keeps that copy
equal to MoEBlock.forward (output and gradients), so its stage times stay those of the real layer."""

from __future__ import annotations

import torch

from benchmarks.layer_host import STAGES, staged_step
from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter


def test_staged_step_equals_the_block():
    torch.manual_seed(0)
    block = MoEBlock(32, 16, 8, TopKRouter(32, 8, 2, True), torch.nn.SiLU(), backend="auto")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    dy = torch.randn(2, 5, 32)
    marks = []
    y = staged_step(block, x, dy, marks.append)
    assert marks == list(STAGES)
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    x.grad = None
    block.zero_grad(set_to_none=True)
    y_ref, _ = block(x)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, [x.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
