"""LM head + cross-entropy a chunk of tokens at a time, gradients computed in the forward pass.

Legend: T tokens, H hidden, V vocabulary, C tokens per chunk.
At V=151,936 the fp32 logits of 16,384 tokens are 10 GB, and their softmax gradient as much again. Here only one
chunk's [C, V] logits exist at a time, and since the gradient of a summed cross-entropy w.r.t. the logits is known
as soon as the logits are (softmax - one-hot), each chunk's input and weight gradients are computed right away: the
backward pass only scales them. No recompute (checkpointing each chunk would redo the LM head matmul, ~11% of a
Qwen3-30B-A3B step), one extra [V, H] fp32 buffer for the weight gradient. On CUDA the softmax gradient is
written over the bf16 logits by one Triton kernel (fp32 arithmetic) and the weight gradient is accumulated in fp32
by cuBLAS: per chunk the logits are written once, read twice and overwritten once.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton

IGNORE_INDEX = -100


def _chunk_loss_and_logit_grad(h_CH, weight_VH, labels_C, want_grad: bool):
    """(summed loss in fp32, d loss / d logits in h's dtype or None)."""
    logits = h_CH @ weight_VH.t()
    if want_grad and use_triton(logits):
        # One kernel reads the logits twice and writes the gradient over them: no fp32 [C, V] copies.
        from framework.ops.triton_kernels import cross_entropy_grad_  # noqa: PLC0415

        return cross_entropy_grad_(logits, labels_C, IGNORE_INDEX).sum(), logits
    logits = logits.to(torch.promote_types(h_CH.dtype, torch.float32))
    valid = labels_C != IGNORE_INDEX
    target = labels_C.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, target, torch.full_like(lse, -1.0).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(h_CH.dtype)


def _add_weight_grad_(grad_w_VH: torch.Tensor, grad_logits_CV: torch.Tensor, h_CH: torch.Tensor) -> None:
    """grad_w += grad_logits.T @ h, accumulated in grad_w's fp32. On CUDA cuBLAS adds the bf16 product into the fp32
    buffer itself (out_dtype); elsewhere the product is materialised first."""
    if grad_w_VH.is_cuda and grad_w_VH.dtype != h_CH.dtype:
        torch.addmm(grad_w_VH, grad_logits_CV.t(), h_CH, out_dtype=grad_w_VH.dtype, out=grad_w_VH)
    else:
        grad_w_VH += grad_logits_CV.t() @ h_CH


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, chunk: int,
                want_grad: bool) -> torch.Tensor:
        compute = torch.promote_types(h_TH.dtype, torch.float32)
        total = h_TH.new_zeros((), dtype=compute)
        grad_h = torch.empty_like(h_TH) if want_grad else None
        grad_w = torch.zeros(weight_VH.shape, dtype=compute, device=weight_VH.device) if want_grad else None
        for start in range(0, h_TH.shape[0], chunk):
            h_CH = h_TH[start:start + chunk]
            loss, grad_logits = _chunk_loss_and_logit_grad(h_CH, weight_VH, labels_T[start:start + chunk], want_grad)
            total += loss
            if want_grad:
                torch.mm(grad_logits, weight_VH, out=grad_h[start:start + chunk])
                _add_weight_grad_(grad_w, grad_logits, h_CH)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VH.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), (grad_w * grad_total).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy_sum(h_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                             chunk: int) -> torch.Tensor:
    """sum over tokens of cross_entropy(h @ weight.T, labels) in fp32, labels == -100 ignored; `chunk` tokens at a
    time. Differentiable w.r.t. h and weight."""
    want_grad = torch.is_grad_enabled() and (h_TH.requires_grad or weight_VH.requires_grad)
    return _LinearCrossEntropySum.apply(h_TH.contiguous(), weight_VH, labels_T.contiguous(), chunk, want_grad)
