"""The top-k softmax router from its input: linear, fp32 softmax over all experts, the k most probable, optionally
renormalised to sum to 1 (transformers' Qwen3MoeTopKRouter / MixtralTopKRouter).

Legend: T tokens, H hidden, E experts, K top-k.
On CUDA one Triton kernel forward (the linear included) and one backward before the linear's two GEMMs
(framework/ops/triton_kernels.py). Eager torch runs a GEMM, softmax, topk, sum, div and a cast forward and eight
autograd nodes backward; at 4,096 tokens their launches paced the MoE layer's host time (benchmarks/PERF_NOTES.md,
changes 23 and 27). The eager chain below is the CPU path and the kernels' reference. Ties between equal
probabilities go to the lower expert id in the kernel; torch.topk does not promise an order for ties.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from framework.ops.triton_available import use_triton


def softmax_topk_reference(logits_TE: torch.Tensor, top_k: int, normalize: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Softmax in fp32 like transformers: a bf16 softmax flips the top-k set of ~1% of tokens.
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    top_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize:
        top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
    return top_TK.to(logits_TE.dtype), ids_TK, probs_TE


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seen: list) -> torch.Tensor:
        ctx.seen = seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.seen.append(grad._use_count())
        return grad, None


@functools.cache
def _fresh_gradient_use_count() -> int:
    """The use count a gradient nothing else holds has inside a custom Function's backward. It depends on the torch
    release: torch 2.11's engine keeps its own reference to the inputs while the Python backward runs (2), torch 2.13's
    does not (1). Read once from a tiny backward on the CPU, first called from a forward (a backward run inside
    another backward could hold references of its own). Inference mode is left for the probe: the first forward may run
    under it (generation, evaluation), where no graph is recorded and the probe's backward would fail."""
    seen: list[int] = []
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros(2, requires_grad=True)
        (_Probe.apply(x, seen) * 2.0).sum().backward()
    return seen[0]


def sole_reference(t: torch.Tensor) -> bool:
    """True, inside a custom Function's backward, when no other tensor, view or Python name shares the incoming
    gradient `t`'s memory: the test autograd's input buffer makes before it adds a gradient in place (one the caller
    passed to backward() fails it). A tensor hook that keeps the gradient is not seen."""
    # storage count: +1 for the storage object this call creates
    return (t._base is None and t._use_count() == _fresh_gradient_use_count()
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2)


class _LinearSoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool):
        from framework.ops.triton_kernels import linear_softmax_topk_forward  # noqa: PLC0415

        tokens_TH = x_TH.view_as(x_TH)
        x_TH, weight_EH = x_TH.contiguous(), weight_EH.contiguous()
        weights_TK, ids_TK, probs_TE, logits_TE = linear_softmax_topk_forward(x_TH, weight_EH, top_k, normalize)
        ctx.save_for_backward(x_TH, weight_EH, probs_TE, ids_TK)
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an output no loss reached needs no zero tensor
        ctx.normalize = normalize
        return weights_TK, ids_TK, probs_TE, logits_TE, tokens_TH

    @staticmethod
    def backward(ctx, grad_weights_TK, _grad_ids, grad_probs_TE, grad_logits_TE, grad_tokens_TH):
        from framework.ops.triton_kernels import softmax_topk_backward  # noqa: PLC0415

        x_TH, weight_EH, probs_TE, ids_TK = ctx.saved_tensors
        grad_TE = softmax_topk_backward(probs_TE, ids_TK, grad_weights_TK, grad_probs_TE, grad_logits_TE,
                                        ctx.normalize, x_TH.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # The dispatch's x-gradient (through the handed-on tokens) joins in the GEMM's epilogue: autograd would
            # otherwise write this GEMM's [T, H] and sum the two in a kernel of its own (PERF_NOTES change 30).
            # Out of place, addmm would first copy the [T, H] it adds to, so it adds in place when nothing else
            # holds that gradient.
            if grad_tokens_TH is None:
                grad_x = grad_TE @ weight_EH
            elif sole_reference(grad_tokens_TH):
                grad_x = grad_tokens_TH.addmm_(grad_TE, weight_EH)
            else:
                grad_x = torch.addmm(grad_tokens_TH, grad_TE, weight_EH)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_TE.t() @ x_TH
        return grad_x, grad_weight, None, None


def linear_softmax_topk(x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K] in x's dtype, expert ids [T, K] int64 in descending probability, probs [T, E] fp32, logits
    [T, E] in x's dtype, tokens [T, H]) for logits = x @ weight^T: the combine weights (renormalised over the k when
    `normalize`), the softmax over all experts, the logits, and x itself for the layer's other consumers to read:
    their x-gradient then reaches x through this op's backward, which adds its own in one GEMM. Gradients flow from
    weights, probs, logits and tokens to x and weight."""
    if use_triton(x_TH) and x_TH.dtype == weight_EH.dtype:
        _fresh_gradient_use_count()  # read before any backward runs
        return _LinearSoftmaxTopK.apply(x_TH, weight_EH, top_k, normalize)
    logits_TE = F.linear(x_TH, weight_EH)
    return (*softmax_topk_reference(logits_TE, top_k, normalize), logits_TE, x_TH)
