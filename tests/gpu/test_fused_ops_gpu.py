"""The Triton kernels of framework/ops against the same ops' torch paths (FRAMEWORK_DISABLE_TRITON's code) on CUDA,
at Qwen3-30B-A3B widths, bf16 and fp32, including an odd row count and an intermediate size that is not a power of 2."""

from __future__ import annotations

import pytest
import torch

from framework.ops import permute, swiglu
from framework.ops.triton_available import triton_importable

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run_both(fn, monkeypatch):
    """fn() once with the kernels, once with the torch path."""
    assert triton_importable(), "Triton is missing on this GPU machine"
    fused = fn()
    monkeypatch.setattr(swiglu, "use_triton", lambda t: False)
    monkeypatch.setattr(permute, "use_triton", lambda t: False)
    ref = fn()
    monkeypatch.undo()
    return fused, ref


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_swiglu_kernel(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    gate_up = torch.randn(4099, 2 * 768, device="cuda", dtype=dtype)
    grad = torch.randn(4099, 768, device="cuda", dtype=dtype)

    def fn():
        x = gate_up.clone().requires_grad_()
        out = swiglu.swiglu(x)
        out.backward(grad)
        return out, x.grad

    (out, g), (out_ref, g_ref) = _run_both(fn, monkeypatch)
    assert rel(out, out_ref) < tol and rel(g, g_ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_gather_sum_kernels(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    tokens, k, hidden = 1027, 8, 2048
    order = torch.randperm(tokens * k, device="cuda")
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    weight = torch.rand(tokens, k, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)

    def fn():
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        rows = permute.replicate_permute_rows(xs, order, inverse, k)
        rows = rows * 1.5  # a non-trivial function between dispatch and combine
        out = permute.weighted_gather_sum(rows, inverse.view(tokens, k), ws)
        out.backward(grad)
        return out, xs.grad, ws.grad

    fused, ref = _run_both(fn, monkeypatch)
    for a, b in zip(fused, ref):
        assert rel(a, b) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_gather_sum_kernels_with_holes(dtype, tol, monkeypatch):
    """Expert-parallel dispatch's expansions: tokens reach some of the J slots only (index R = hole)."""
    torch.manual_seed(0)
    tokens, slots, hidden = 2053, 4, 2048
    used = torch.rand(tokens, slots, device="cuda") < 0.6
    used[:, 0] |= ~used.any(1)
    rows = int(used.sum())
    order = torch.randperm(rows, device="cuda")
    index = torch.full((tokens, slots), rows, dtype=torch.int64, device="cuda")
    index[used] = order
    src = torch.empty(rows, dtype=torch.int64, device="cuda")
    src[order] = torch.arange(tokens, device="cuda").unsqueeze(1).expand(tokens, slots)[used]
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    weight = torch.rand(tokens, slots, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)

    def fn():
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        expanded = permute.expand_rows(xs, src, index) * 1.5
        out = permute.weighted_gather_sum(expanded, index, ws) + permute.gather_sum(expanded, index, src)
        out.backward(grad)
        return out, xs.grad, ws.grad

    fused, ref = _run_both(fn, monkeypatch)
    for a, b in zip(fused, ref):
        assert rel(a, b) < tol
