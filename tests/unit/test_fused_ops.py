"""The fused MoE ops' own forward/backward formulas (the torch paths: CPU, and the reference of the CUDA kernels)
against autograd through the plain definitions, in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.ops.permute import expand_rows, gather_sum
from framework.ops.swiglu import glu, swiglu


def test_swiglu_matches_autograd_of_definition():
    """Unscaled, and scaled per row by routing weights (their gradient a dot over the row)."""
    torch.manual_seed(0)
    gate_up = torch.randn(37, 2 * 24, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(37, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(37, 24, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    out = swiglu(gate_up)
    ref = F.silu(gate) * up
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, gate_up, grad)[0], torch.autograd.grad(ref, gate_up, grad)[0],
                               rtol=1e-12, atol=1e-12)
    out = swiglu(gate_up, weight)
    ref = F.silu(gate) * up * weight.unsqueeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    got, want = (torch.autograd.grad(y, (gate_up, weight), grad) for y in (out, ref))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_glu_other_activation_is_eager_formula():
    gate_up = torch.randn(5, 8, dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(glu(gate_up, torch.nn.GELU()), F.gelu(gate_up[:, :4]) * gate_up[:, 4:])
    torch.testing.assert_close(glu(gate_up, torch.nn.GELU(), weight),
                               F.gelu(gate_up[:, :4]) * gate_up[:, 4:] * weight[:, None])


def _routing(tokens: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(tokens * k, generator=g)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return order, inverse


def test_gather_sum_matches_autograd_of_definition():
    tokens, k, hidden = 11, 3, 16
    order, inverse = _routing(tokens, k)
    rows = torch.randn(tokens * k, hidden, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(tokens, hidden, dtype=torch.float64)
    index = inverse.view(tokens, k)
    out = gather_sum(rows, index)
    (g_rows,) = torch.autograd.grad(out, rows, grad)
    ref = rows[index].sum(1)  # plain indexing: autograd's own scatter backward
    (r_rows,) = torch.autograd.grad(ref, rows, grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_rows, r_rows, rtol=1e-12, atol=1e-12)


def test_expand_rows_backward_is_k_way_sum():
    tokens, k, hidden = 9, 4, 8
    order, inverse = _routing(tokens, k, seed=1)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(tokens * k, hidden, dtype=torch.float64)
    rows = expand_rows(x, order // k, inverse.view(tokens, k))
    (g,) = torch.autograd.grad(rows, x, grad)
    ref_rows = x[order // k]
    (r,) = torch.autograd.grad(ref_rows, x, grad)
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_matches_unchunked_autograd():
    from framework.ops.linear_cross_entropy import linear_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (23,))
    labels[[0, 7, 8]] = -100
    loss = linear_cross_entropy_sum(h, w, labels, chunk=5)
    g_h, g_w = torch.autograd.grad(loss * 0.5, (h, w))
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    r_h, r_w = torch.autograd.grad(ref * 0.5, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_h, r_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, r_w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(h, w, labels, chunk=4), ref, rtol=1e-12, atol=1e-12)


def _holey_expansion(tokens: int, slots: int, seed: int):
    """A random expansion with holes: each (t, j) slot is used with probability 1/2 (at least one per token)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.rand(tokens, slots, generator=g) < 0.5
    used[:, 0] |= ~used.any(1)
    rows = int(used.sum())
    order = torch.randperm(rows, generator=g)
    index = torch.full((tokens, slots), rows, dtype=torch.int64)
    index[used] = order
    src = torch.empty(rows, dtype=torch.int64)
    src[order] = torch.arange(tokens).unsqueeze(1).expand(tokens, slots)[used]
    return src, index, used


def test_expansion_and_gather_sum_with_holes_match_autograd_of_definition():
    tokens, slots, hidden = 13, 4, 6
    src, index, used = _holey_expansion(tokens, slots, seed=2)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    rows = expand_rows(x, src, index)
    ref_rows = x[src]
    grad = torch.randn_like(ref_rows)
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(rows, x, grad)[0], torch.autograd.grad(ref_rows, x, grad)[0])

    r = torch.randn(src.numel(), hidden, dtype=torch.float64, requires_grad=True)
    safe = index.clamp_max(src.numel() - 1)
    g_out = torch.randn(tokens, hidden, dtype=torch.float64)
    plain = gather_sum(r, index)
    ref_plain = (r[safe] * used.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(plain, ref_plain)
    torch.testing.assert_close(torch.autograd.grad(plain, r, g_out)[0], torch.autograd.grad(ref_plain, r, g_out)[0])


def test_rms_norm_matches_transformers_module():
    """framework's RMSNorm (torch's rms_norm) against transformers' Qwen3MoeRMSNorm, same parameter, fp32 and bf16."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from framework.models.norm import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-6), Qwen3MoeRMSNorm(64, eps=1e-6)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 64) * 3
    grad = torch.randn(3, 5, 64)
    for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)]:
        outs = []
        for m in (ours, ref):
            m = m.to(dtype)
            m.zero_grad()
            xi = x.to(dtype).clone().requires_grad_()
            y = m(xi)
            y.backward(grad.to(dtype))
            outs.append((y.float(), xi.grad.float(), m.weight.grad.float()))
        for a, b in zip(*outs):
            assert ((a - b).norm() / b.norm()).item() < tol, dtype


def test_expand_by_expert_gives_sorted_rows_and_grouped_mm_offsets():
    """The local dispatch: each token's row and routing weight once per slot, sorted stably by expert, the inverse of
    every slot and the row ends per expert as int32 cumulative sums (`torch._grouped_mm`'s offs), against a per-slot
    loop; the rows' gradient is each token's K-way sum, the weights' each row's own; group_counts inverts
    group_ends."""
    from framework.ops.expert_sort import expand_by_expert, group_counts, group_ends

    torch.manual_seed(0)
    ids = torch.randint(0, 6, (11, 3))
    ids[:, 0] = 2  # expert 2 crowded, some experts empty
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(11, 3, dtype=torch.float64, requires_grad=True)
    rows, row_w, inverse, ends = expand_by_expert(x, ids, w, 7)
    flat = ids.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda s: (flat[s], s))
    assert torch.equal(rows, x.detach()[[s // 3 for s in order]])
    assert torch.equal(row_w, w.detach().reshape(-1)[order])
    assert inverse.shape == (11, 3) and inverse.dtype == torch.int64
    assert [order[r] for r in inverse.reshape(-1).tolist()] == list(range(len(flat)))
    counts = [flat.count(e) for e in range(7)]
    assert ends.dtype == torch.int32 and ends.tolist() == [sum(counts[:e + 1]) for e in range(7)]
    grad, grad_w = torch.randn_like(rows), torch.randn_like(row_w)
    g, g_w = torch.autograd.grad((rows, row_w), (x, w), (grad, grad_w))
    torch.testing.assert_close(g, grad[inverse].sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(g_w, grad_w[inverse])
    assert group_counts(ends).tolist() == counts
    assert group_ends(torch.tensor([[0, 2], [3, 0]])).tolist() == [[0, 2], [3, 3]]


def _router_kernels_in_torch(monkeypatch) -> None:
    """Stand in for the router's two Triton kernels (framework.ops.triton_kernels, CUDA only) with their formulas in
    torch, so that the Function's own autograd runs on CPU."""
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    from framework.ops.softmax_topk import softmax_topk_reference  # noqa: PLC0415

    def forward(x_TH, weight_EH, top_k, normalize):
        logits = x_TH @ weight_EH.t()
        return (*softmax_topk_reference(logits, top_k, normalize), logits)

    def backward(probs, ids, grad_weights, grad_probs, grad_logits, normalize, dtype):
        g = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(probs.dtype).expand_as(probs).clone()
        if grad_weights is not None:
            gw, top = grad_weights.to(probs.dtype), probs.gather(1, ids)
            if normalize:  # w = top / s
                s = top.sum(-1, keepdim=True)
                gw = (gw - (gw * top).sum(-1, keepdim=True) / s) / s
            g.scatter_add_(1, ids, gw)
        grad = probs * (g - (probs * g).sum(-1, keepdim=True))
        return (grad if grad_logits is None else grad + grad_logits).to(dtype)

    monkeypatch.setitem(sys.modules, "framework.ops.triton_kernels",
                        types.SimpleNamespace(linear_softmax_topk_forward=forward, softmax_topk_backward=backward))


def test_fresh_gradient_use_count_read_under_inference_mode():
    """The router's first forward may run under torch.inference_mode (generation, evaluation): the use-count probe
    leaves it for its own backward and reads the same count as outside."""
    from framework.ops import softmax_topk  # noqa: PLC0415

    softmax_topk._fresh_gradient_use_count.cache_clear()
    outside = softmax_topk._fresh_gradient_use_count()
    softmax_topk._fresh_gradient_use_count.cache_clear()
    with torch.inference_mode():
        assert softmax_topk._fresh_gradient_use_count() == outside
    assert outside in (1, 2)  # torch 2.13 / 2.11


def test_router_function_adds_its_x_gradient_to_the_dispatchs(monkeypatch):
    """The router's Function hands x on; the gradient that comes back through it is added to the router's own
    x-gradient: in place when nothing else holds it (a consumer's fresh gradient, from a torch op or a Python
    Function's backward), out of place when someone does (the caller passed it to backward(), and must find it
    unchanged), under the torch release's own reference counting (2.11 and 2.13 differ). All against autograd of the
    eager chain with x read twice."""
    from framework.ops import softmax_topk  # noqa: PLC0415
    from framework.ops.permute import expand_rows  # noqa: PLC0415

    _router_kernels_in_torch(monkeypatch)
    seen: list[bool] = []
    sole_reference = softmax_topk.sole_reference

    def spy(t: torch.Tensor) -> bool:
        seen.append(sole_reference(t))
        return seen[-1]

    monkeypatch.setattr(softmax_topk, "sole_reference", spy)
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64)
    weight = torch.randn(8, 16, dtype=torch.float64) / 4
    gw, gp, gy = (torch.randn(37, n, dtype=torch.float64) for n in (3, 8, 16))
    held = gy.clone()
    rows = torch.arange(37)

    def dispatch(t: torch.Tensor) -> torch.Tensor:  # a Python Function's backward makes the gradient, as in the layer
        return expand_rows(t, rows, rows.view(37, 1))

    for consume, in_place in ((lambda t: t * 3.0, True), (dispatch, True), (lambda t: t, False)):
        ours_x, ours_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        weights, ids, probs, _logits, tokens = softmax_topk._LinearSoftmaxTopK.apply(ours_x, ours_w, 3, True)
        assert tokens.data_ptr() == ours_x.data_ptr()
        torch.autograd.backward((weights, probs, consume(tokens)), (gw, gp, gy))
        assert seen[-1] is in_place and torch.equal(gy, held)
        ref_x, ref_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_weights, ref_ids, ref_probs = softmax_topk.softmax_topk_reference(F.linear(ref_x, ref_w), 3, True)
        assert torch.equal(ids, ref_ids)
        torch.autograd.backward((ref_weights, ref_probs, consume(ref_x)), (gw, gp, gy))
        # the softmax is fp32 on both sides (as transformers'), hence fp32 tolerances
        torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
