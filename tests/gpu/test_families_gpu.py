"""Full-width parity per family on the GPU: our MoE block in bf16 against stock transformers' fp32 block (eager
experts), with stock transformers' own bf16 block (grouped_mm experts) as the yardstick: at each family's real width
our error must be no larger than stock's (10% slack for summation-order noise). Both bf16 blocks compute the router
the same way, so near-tie routing flips hit both alike. The model shapes are the repository's real-shape run YAMLs.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.moe_layer import family_blocks
from framework.moe.experts import megablocks_import_error

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_SHAPES = ["qwen3-30b-a3b.yaml", "mixtral-8x7b.yaml", "qwen1.5-moe-a2.7b.yaml", "olmoe-1b-7b.yaml",
               "moonlight-16b-a3b.yaml"]
TOKENS = 4096


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _errors(block, ref, x, dy) -> dict[str, float]:
    """Relative errors of one forward+backward of `block` against `ref` (fp32) from the same input."""
    ref.zero_grad(set_to_none=True)  # ref serves both blocks: its gradients must not accumulate over the two calls
    xb = x.clone().requires_grad_()
    out = block(xb.view(1, *x.shape))
    y = out[0] if isinstance(out, tuple) else out
    (y.float().view_as(dy) * dy).sum().backward()
    xr = x.float().requires_grad_()
    out = ref(xr.view(1, *x.shape))
    yr = out[0] if isinstance(out, tuple) else out
    (yr.view_as(dy) * dy).sum().backward()
    errors = {"forward": rel(y, yr), "grad_x": rel(xb.grad, xr.grad)}
    ref_params = dict(ref.named_parameters())
    for name, p in block.named_parameters():
        errors[f"grad {name}"] = rel(p.grad, ref_params[name].grad)
    return errors


@pytest.mark.parametrize("backend", ["grouped_mm", "megablocks"])
@pytest.mark.parametrize("config", REAL_SHAPES)
def test_block_error_no_larger_than_stock_bf16(config, backend):
    if backend == "megablocks" and megablocks_import_error():
        pytest.fail(f"megablocks backend unavailable on a GPU machine: {megablocks_import_error()}")
    torch.manual_seed(0)
    ours_block, stock_block, (hidden, *_), _ = family_blocks(os.path.join(REPO, "model_configs", config))
    ours = ours_block(backend)
    state = ours.state_dict()
    stock = stock_block("grouped_mm")
    stock.load_state_dict(state, strict=True)
    ref = stock_block("eager").float()
    ref.load_state_dict(state, strict=True)
    x = torch.randn(TOKENS, hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(TOKENS, hidden, device="cuda")
    got, yardstick = _errors(ours, ref, x, dy), _errors(stock, ref, x, dy)
    print(f"\n{config} {backend}: " + " ".join(f"{k}={got[k]:.2e}/{yardstick[k]:.2e}" for k in got))
    worse = {k: (got[k], yardstick[k]) for k in got if got[k] > 1.1 * yardstick[k] + 1e-6}
    assert not worse, worse
