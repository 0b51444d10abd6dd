"""The Triton kernels of framework/ops against the same ops' torch paths (FRAMEWORK_DISABLE_TRITON's code) on CUDA,
at Qwen3-30B-A3B widths, bf16 and fp32, including an odd row count and an intermediate size that is not a power of 2;
the AdamW step kernel against torch's fused CUDA AdamW."""

from __future__ import annotations

import pytest
import torch

from framework.ops import adamw, expert_sort, linear_cross_entropy, permute, softmax_topk, swiglu
from framework.ops.triton_available import triton_importable

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run_both(fn, monkeypatch):
    """fn() once with the kernels, once with the torch path."""
    assert triton_importable(), "Triton is missing on this GPU machine"
    fused = fn()
    for module in (swiglu, permute, expert_sort, linear_cross_entropy, softmax_topk):
        monkeypatch.setattr(module, "use_triton", lambda t: False)
    monkeypatch.setattr(linear_cross_entropy, "_add_weight_grad_", lambda g, a, b: g.add_(a.t() @ b))
    ref = fn()
    monkeypatch.undo()
    return fused, ref


def _assert_kernels_match(fn, monkeypatch, tol: float):
    fused, ref = _run_both(fn, monkeypatch)
    for a, b in zip(fused, ref):
        assert rel(a, b) < tol
    return fused


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("rows,inter", [(4099, 768), (1027, 1536), (37, 200)])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_swiglu_kernel(dtype, tol, rows, inter, weighted, monkeypatch):
    """Unscaled and scaled by row weights (the routing weights), at Qwen3-30B-A3B's and -235B-A22B's expert widths
    and one that is not a multiple of the backward's column tile."""
    torch.manual_seed(0)
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype)
    weight = torch.rand(rows, device="cuda", dtype=dtype)
    grad = torch.randn(rows, inter, device="cuda", dtype=dtype)

    def fn():
        x, w = gate_up.clone().requires_grad_(), weight.clone().requires_grad_()
        out = swiglu.swiglu(x, w if weighted else None)
        out.backward(grad)
        return (out, x.grad, w.grad) if weighted else (out, x.grad)

    _assert_kernels_match(fn, monkeypatch, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_gather_sum_kernels(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    tokens, k, hidden = 1027, 8, 2048
    order = torch.randperm(tokens * k, device="cuda")
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    scale = torch.rand(tokens * k, 1, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)

    def fn():
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        rows = permute.expand_rows(xs, order // k, inverse.view(tokens, k))
        rows = rows * ss  # a non-trivial function between dispatch and combine
        out = permute.gather_sum(rows, inverse.view(tokens, k))
        out.backward(grad)
        return out, xs.grad, ss.grad

    _assert_kernels_match(fn, monkeypatch, tol)


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
    scale = torch.rand(rows, 1, device="cuda", dtype=dtype)
    grad = torch.randn(tokens, hidden, device="cuda", dtype=dtype)

    def fn():
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        out = permute.gather_sum(permute.expand_rows(xs, src, index) * ss, index)
        out.backward(grad)
        return out, xs.grad, ss.grad

    _assert_kernels_match(fn, monkeypatch, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_linear_cross_entropy_kernel(dtype, tol, monkeypatch):
    """The Triton softmax-gradient kernel and cuBLAS fp32 accumulation against the torch path, at Qwen3's width and
    vocabulary, a chunk that does not divide the tokens and ignored labels; the loss also against float64."""
    torch.manual_seed(0)
    tokens, hidden, vocab = 1000, 2048, 151936
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w = torch.randn(vocab, hidden, device="cuda", dtype=dtype) * 0.02
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::7] = -100

    def fn():
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy.linear_cross_entropy_sum(hs, ws, labels, chunk=384)
        (loss * 0.5).backward()
        return loss, hs.grad, ws.grad

    fused = _assert_kernels_match(fn, monkeypatch, tol)
    exact = torch.nn.functional.cross_entropy((h.double() @ w.double().t()), labels, reduction="sum")
    assert abs(fused[0].item() - exact.item()) / exact.item() < (1e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("shape", [(4099, 2048), (4099 * 32, 128)])
def test_rms_norm_on_cuda_matches_transformers_and_saves_input_and_rstd(shape):
    """torch's CUDA rms_norm (framework RMSNorm) against transformers' module in bf16, and the tensors it keeps for
    backward: its input and one fp32 per row, as framework/tuning/activations.py counts."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from framework.models.norm import RMSNorm

    torch.manual_seed(0)
    rows, width = shape
    ours = RMSNorm(width, eps=1e-6).cuda().bfloat16()
    ref = Qwen3MoeRMSNorm(width, eps=1e-6).cuda().bfloat16()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) * 3
    grad = torch.randn_like(x)
    saved: list[torch.Tensor] = []
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        if m is ours:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = m(xi)
        else:
            y = m(xi)
        y.backward(grad)
        results.append((y, xi.grad, m.weight.grad))
    for a, b in zip(*results):
        assert rel(a, b) < 1e-2
    kept = sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr()
               != ours.weight.untyped_storage().data_ptr())
    assert kept == rows * (2 * width + 4)


@pytest.mark.parametrize("tokens,k,experts,skew,hidden", [
    (4096, 8, 128, False, 2048), (65536, 8, 128, False, 2048), (4099, 8, 128, True, 2048), (1027, 4, 60, False, 4096),
    (2053, 8, 256, True, 7168), (3, 2, 4, False, 64), (600, 2, 8, True, 300), (257, 6, 512, False, 1024)])
def test_expand_by_expert_kernels_equal_stable_argsort(tokens, k, experts, skew, hidden, monkeypatch):
    """The sort-and-copy kernels equal torch's stable argsort (rows x[order // K], the inverse and the int32 row
    ends), exactly: including a skew that sends 70% of the slots to expert 0, expert counts that are not powers of 2
    and widths that are not multiples of the copy's column tile; the rows' gradient equals the torch path's."""
    assert triton_importable(), "Triton is missing on this GPU machine"
    torch.manual_seed(0)
    ids = torch.randint(0, experts, (tokens, k), device="cuda")
    if skew:
        ids = torch.where(torch.rand(tokens, k, device="cuda") < 0.7, torch.zeros_like(ids), ids)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens * k, hidden, device="cuda", dtype=torch.bfloat16)
    grad_w = torch.randn(tokens * k, device="cuda", dtype=torch.bfloat16)

    def run():
        rows, row_w, inverse, ends = expert_sort.expand_by_expert(x, ids, w, experts)
        g, g_w = torch.autograd.grad((rows, row_w), (x, w), (grad, grad_w))
        return rows, row_w, inverse, ends, g, g_w

    got, want = _run_both(run, monkeypatch)
    for name, a, b in zip(("rows", "row weights", "inverse", "ends", "grad weights"), got[:4] + got[5:],
                          want[:4] + want[5:]):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert rel(got[4], want[4]) < 1e-2  # the kernel sums K slots in fp32, the torch path in bf16


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens,hidden,experts,k,dtype", [(4099, 2048, 128, 8, torch.bfloat16),
                                                           (4099, 2048, 128, 8, torch.float32),
                                                           (65536, 2048, 128, 8, torch.bfloat16),
                                                           (1027, 2048, 60, 4, torch.bfloat16),
                                                           (515, 4096, 8, 2, torch.float32),
                                                           (33, 200, 64, 1, torch.bfloat16)])
def test_linear_softmax_topk_kernels_match_the_eager_router(tokens, hidden, experts, k, dtype, normalize):
    """The router kernels against the eager chain (F.linear, softmax in fp32, torch.topk, renormalise, cast) and its
    autograd, with gradients reaching the weights, the probabilities, the logits (the z-loss's) or several. The
    logits against F.linear's (the kernel sums in its own order: bf16 logits may differ by one rounding step); the
    rest against the eager chain fed our logits, so that a near-tie the two linears round apart cannot flip a choice.
    The kernel's top-k is the stable descending order of its probabilities (ties to the lower id); it equals
    torch.topk's choice on every token without a tie at the k-th place, and the weights and gradients are compared
    expert by expert, as torch orders tied experts its own way."""
    assert triton_importable(), "Triton is missing on this GPU machine"
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    weight = (torch.randn(experts, hidden, device="cuda") * 2 / hidden ** 0.5).to(dtype)
    x_in, w_in = x.clone().requires_grad_(), weight.clone().requires_grad_()
    weights, ids, probs, logits, x_out = softmax_topk._LinearSoftmaxTopK.apply(x_in, w_in, k, normalize)
    assert logits.dtype == weights.dtype == dtype and probs.dtype == torch.float32 and ids.dtype == torch.int64
    assert x_out.data_ptr() == x_in.data_ptr() and torch.equal(x_out, x_in)  # x handed on, not copied
    ref_logits = torch.nn.functional.linear(x, weight)
    assert rel(logits, ref_logits) < (1e-5 if dtype == torch.float32 else 2e-3)  # its own summation order
    ref_in = logits.detach().clone().requires_grad_()
    ref_weights, ref_ids, ref_probs = softmax_topk.softmax_topk_reference(ref_in, k, normalize)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(probs, ref_probs) < 1e-6
    ordered = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)
    assert torch.equal(ids, ordered.indices[:, :k])
    tied = ordered.values[:, k - 1] == ordered.values[:, k] if k < experts else torch.zeros_like(ids[:, 0], dtype=bool)
    assert torch.equal(ids.sort(-1).values[~tied], ref_ids.sort(-1).values[~tied])
    # slot j of ours holds expert ids[t, j]; `pos` is that expert's slot in torch's order
    pos = (ids.unsqueeze(-1) == ref_ids.unsqueeze(1)).to(torch.int8).argmax(-1)
    same = ~tied
    assert rel(weights[same], torch.gather(ref_weights, 1, pos)[same]) < tol
    # no gradient from the tied tokens, so that the router weight's gradient (a sum over tokens) compares whole
    grad_weights = (torch.randn(tokens, k, device="cuda") * same[:, None]).to(dtype)
    grad_probs = torch.randn(tokens, experts, device="cuda") * same[:, None]
    grad_logits = (torch.randn(tokens, experts, device="cuda") * same[:, None]).to(dtype)
    # what the dispatch sends back through the handed-on x, which the backward adds in its GEMM
    grad_tokens = (torch.randn(tokens, hidden, device="cuda") * same[:, None]).to(dtype)
    for use_weights, use_probs, use_logits, use_tokens in ((True, True, True, False), (True, False, False, False),
                                                           (False, True, False, False), (False, False, True, False),
                                                           (True, True, True, True)):
        if k == 1 and normalize and not (use_probs or use_logits):
            continue  # one renormalised weight is 1 whatever the logits: its gradient is zero up to rounding
        x_in.grad = w_in.grad = ref_in.grad = None
        ours_out = [(weights, torch.gather(grad_weights, 1, pos))] if use_weights else []
        ref_out = [(ref_weights, grad_weights)] if use_weights else []
        if use_probs:
            ours_out.append((probs, grad_probs))
            ref_out.append((ref_probs, grad_probs))
        if use_logits:
            ours_out.append((logits, grad_logits))
            ref_out.append((ref_in, grad_logits))
        if use_tokens:
            ours_out.append((x_out, grad_tokens))
        torch.autograd.backward(*zip(*ours_out), retain_graph=True)
        torch.autograd.backward(*zip(*ref_out), retain_graph=True)
        # the linear's backward in fp32 from the eager chain's logits gradient
        ref_grad = ref_in.grad.float()
        assert x_in.grad.dtype == w_in.grad.dtype == dtype
        case = (use_weights, use_probs, use_logits, use_tokens)
        ref_grad_x = ref_grad @ weight.float() + (grad_tokens.float() if use_tokens else 0.0)
        assert rel(x_in.grad[same], ref_grad_x[same]) < max(tol, 1e-5), case
        assert rel(w_in.grad, ref_grad.t() @ x.float()) < max(tol, 1e-5), case


@pytest.mark.parametrize("scale", [None, 3.7])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_adamw_step_kernel_matches_fused_adamw(grad_dtype, scale):
    """The Triton AdamW step against torch.optim.AdamW(fused=True), the ZeRO step's optimizer, over 3 steps: the
    gradient read in its own dtype and unscaled in-kernel (torch's side gets it in fp32, its grad_scale attribute
    unscaling it in its kernel), the bf16 params written as it goes, the gradient left as it was."""
    assert triton_importable(), "Triton is missing on this GPU machine"
    torch.manual_seed(0)
    n = 3 * 2**20 + 17
    init = torch.randn(n, device="cuda")
    ref = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    grad_scale = torch.tensor(scale, device="cuda") if scale is not None else None
    if grad_scale is not None:
        opt.grad_scale = grad_scale
    param, exp_avg, exp_avg_sq = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    spread = torch.logspace(-6, 1, n, device="cuda")  # some elements small enough for eps to matter
    for step in range(1, 4):
        grad = torch.randn(n, device="cuda") * spread[torch.randperm(n, device="cuda")] * (scale or 1.0)
        grad = grad.to(grad_dtype)
        grad_before = grad.clone()
        ref.grad = grad.to(torch.float32, copy=True)  # fused AdamW writes the unscaled gradient back into it
        opt.step()
        adamw.adamw_step_(param, grad, exp_avg, exp_avg_sq, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                          weight_decay=0.1, step=step, grad_scale=grad_scale, out=out)
        assert torch.equal(grad, grad_before)
        state = opt.state[ref]
        # torch's kernel mixes its double scalars into the fp32 values (double products and sums, rounded once);
        # this one is fp32 throughout: ulps apart. exp_avg's terms cancel where the gradient opposes it, so its
        # absolute tolerance is ulps of its largest element.
        torch.testing.assert_close(param, ref.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-7)
        m_atol = 2e-7 * state["exp_avg"].abs().max().item()
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=m_atol)
        assert torch.equal(out, param.to(torch.bfloat16))
