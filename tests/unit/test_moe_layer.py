"""The MoE block against a float64 per-token loop, backends against each other, edge cases of routing."""

from __future__ import annotations

import pytest
import torch

from framework.moe.experts import BACKENDS, resolve_backend
from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter
from framework.ops.permute import expand_rows
from tests.helpers import rel_err
from tests.reference import moe_reference, route_reference

H, I, E, K = 32, 24, 8, 2


def make_block(backend: str, seed: int = 0, dtype=torch.float32) -> MoEBlock:
    torch.manual_seed(seed)
    block = MoEBlock(H, I, E, TopKRouter(H, E, K, True), act=torch.nn.SiLU(), backend=backend)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
    return block.to(dtype)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_block_matches_float64_loop_forward_and_grads(backend):
    block = make_block(backend)
    x = torch.randn(2, 9, H, requires_grad=True)
    y, _ = block(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()

    xd = x.detach().double().requires_grad_()
    gate = block.gate.weight.detach().double().requires_grad_()
    gu = block.experts.gate_up_proj.detach().double().requires_grad_()
    down = block.experts.down_proj.detach().double().requires_grad_()
    ids, w = route_reference(xd.reshape(-1, H), gate, K, norm=True)
    ref = moe_reference(xd.reshape(-1, H), ids, w, gu, down).view_as(xd)
    (ref * dy.double()).sum().backward()

    assert rel_err(y, ref) <= 1e-5
    assert rel_err(x.grad, xd.grad) <= 1e-5
    assert rel_err(block.gate.weight.grad, gate.grad) <= 1e-5
    assert rel_err(block.experts.gate_up_proj.grad, gu.grad) <= 1e-5
    assert rel_err(block.experts.down_proj.grad, down.grad) <= 1e-5


def test_grouped_mm_matches_eager_exactly_enough():
    ref, new = make_block("eager"), make_block("grouped_mm")
    x = torch.randn(4, 16, H)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, sr = ref(xr)
    yn, sn = new(xn)
    yr.square().sum().backward()
    yn.square().sum().backward()
    assert rel_err(yn, yr) <= 1e-6
    assert rel_err(xn.grad, xr.grad) <= 1e-6
    for (name, p), q in zip(new.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6, name
    assert torch.equal(sn.tokens_per_expert, sr.tokens_per_expert)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_all_tokens_to_two_experts_others_empty(backend):
    block = make_block(backend)
    with torch.no_grad():  # positive inputs and router rows 3 > 5 > 0 > others: every token picks experts 3 and 5
        block.gate.weight.zero_()
        block.gate.weight[3] = 2.0
        block.gate.weight[5] = 1.0
        block.gate.weight[[0, 1, 2, 4, 6, 7]] = -1.0
    x = (torch.rand(3, 7, H) + 0.1).requires_grad_()
    y, stats = block(x)
    assert stats.tokens_per_expert.tolist() == [0, 0, 0, 21, 0, 21, 0, 0]
    y.sum().backward()
    ids, w = route_reference(x.detach().reshape(-1, H), block.gate.weight.detach(), K, norm=True)
    assert set(ids.flatten().tolist()) == {3, 5}
    ref = moe_reference(x.detach().reshape(-1, H), ids, w, block.experts.gate_up_proj.detach(),
                        block.experts.down_proj.detach())
    assert rel_err(y.reshape(-1, H), ref) <= 1e-5
    g = block.experts.gate_up_proj.grad
    assert torch.isfinite(g).all()
    empty = [0, 1, 2, 4, 6, 7]
    assert g[empty].abs().max() == 0 and block.experts.down_proj.grad[empty].abs().max() == 0
    assert g[3].abs().max() > 0 and g[5].abs().max() > 0


def test_every_token_reaches_all_k_experts_dropless():
    block = make_block("grouped_mm")
    x = torch.randn(64, 1, H)
    _, stats = block(x)
    assert stats.tokens_per_expert.sum().item() == 64 * K


def test_permutation_ops_round_trip_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(10, 6, requires_grad=True)
    ids = torch.randint(0, 4, (10 * 3,))
    order = torch.argsort(ids, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    rows = expand_rows(x, order // 3, inverse.view(10, 3))
    assert torch.equal(rows, x[order // 3])
    back = rows[inverse]  # undo the permutation: token-major copies again
    assert torch.equal(back.view(10, 3, 6), x.detach().unsqueeze(1).expand(10, 3, 6))
    upstream = torch.randn(30, 6)
    (back * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream.view(10, 3, 6).sum(1))


def test_bf16_block_close_to_fp32():
    b32, b16 = make_block("grouped_mm"), make_block("grouped_mm", dtype=torch.bfloat16)
    x = torch.randn(4, 32, H)
    y32, _ = b32(x)
    y16, _ = b16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16.float(), y32) < 3e-2


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown MoE backend 'cutlass'"):
        resolve_backend("cutlass")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="install_gpu_extras.sh"):
            MoEBlock(H, I, E, TopKRouter(H, E, K, True), torch.nn.SiLU(), backend="megablocks")
        assert resolve_backend("auto") == "grouped_mm"
    assert set(BACKENDS) == {"eager", "grouped_mm", "megablocks"}
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEBlock(H, I, E, TopKRouter(H, E, E + 1, True), torch.nn.SiLU(), backend="eager")
