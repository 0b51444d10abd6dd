"""The top-k softmax router after its linear: fp32 softmax over all experts, the k most probable, optionally
renormalised to sum to 1 (transformers' Qwen3MoeTopKRouter / MixtralTopKRouter).

Legend: T tokens, E experts, K top-k.
On CUDA one Triton kernel each way (framework/ops/triton_kernels.py). Eager torch runs softmax, topk, sum, div and a
cast forward and seven autograd nodes backward; at 4,096 tokens their launches were a third of the MoE layer's host
time, which paced the layer (benchmarks/PERF_NOTES.md, change 23). The eager chain below is the CPU path and the
kernels' reference. Ties between equal probabilities go to the lower expert id in the kernel; torch.topk does not
promise an order for ties.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton


def softmax_topk_reference(logits_TE: torch.Tensor, top_k: int, normalize: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Softmax in fp32 like transformers: a bf16 softmax flips the top-k set of ~1% of tokens.
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    top_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize:
        top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
    return top_TK.to(logits_TE.dtype), ids_TK, probs_TE


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, top_k: int, normalize: bool):
        from framework.ops.triton_kernels import softmax_topk_forward  # noqa: PLC0415

        weights_TK, ids_TK, probs_TE = softmax_topk_forward(logits_TE.contiguous(), top_k, normalize)
        ctx.save_for_backward(probs_TE, ids_TK)
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an output no loss reached needs no zero tensor
        ctx.normalize, ctx.dtype = normalize, logits_TE.dtype
        return weights_TK, ids_TK, probs_TE

    @staticmethod
    def backward(ctx, grad_weights_TK, _grad_ids, grad_probs_TE):
        from framework.ops.triton_kernels import softmax_topk_backward  # noqa: PLC0415

        probs_TE, ids_TK = ctx.saved_tensors
        grad = softmax_topk_backward(probs_TE, ids_TK, grad_weights_TK, grad_probs_TE, ctx.normalize, ctx.dtype)
        return grad, None, None


def softmax_topk(logits_TE: torch.Tensor, top_k: int, normalize: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K] in the logits' dtype, expert ids [T, K] int64 in descending probability, probs [T, E] fp32):
    the combine weights (renormalised over the k when `normalize`) and the softmax over all experts. Gradients flow
    from weights and probs to the logits."""
    if use_triton(logits_TE):
        return _SoftmaxTopK.apply(logits_TE, top_k, normalize)
    return softmax_topk_reference(logits_TE, top_k, normalize)
