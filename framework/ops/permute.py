"""Row permutations and the K-way gather-sum that undoes a top-k replication, with cheap backward passes.

Legend: T tokens, K copies per token (top-k), R = T*K rows, H hidden.
`x[index]` in autograd backpropagates through an accumulating scatter (atomics). When `index` is a permutation, or a
replication of each row K times, the backward is itself a gather, which is faster and deterministic. Dispatch (each
token copied K times into expert order) and combine (each token's K expert outputs summed back, weighted) are each
other's transpose, so one gather-sum op serves combine's forward and dispatch's backward; on CUDA it is one Triton
kernel reading each row once (framework/ops/triton_kernels.py), in place of a gather into a [R, H] temporary and a
reduction over it.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a permutation `index` whose inverse is `inverse` (`inverse[index[i]] == i`)."""
    return _Permute.apply(x, index, inverse)


def _gather_sum(rows_RH: torch.Tensor, index_TK: torch.Tensor, weight_TK: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_k weight[t, k] * rows[index[t, k]] (weight None: plain sum). No autograd."""
    if use_triton(rows_RH):
        from framework.ops.triton_kernels import gather_sum_forward  # noqa: PLC0415
        return gather_sum_forward(rows_RH.contiguous(), index_TK.contiguous(),
                                  None if weight_TK is None else weight_TK.contiguous())
    tokens, k = index_TK.shape
    slots_TKH = rows_RH.index_select(0, index_TK.reshape(-1)).view(tokens, k, -1)
    if weight_TK is None:
        return slots_TKH.sum(1)
    return torch.bmm(weight_TK.unsqueeze(1).to(slots_TKH.dtype), slots_TKH).squeeze(1)


class _ReplicatePermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, torch.div(order, copies, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _gather_sum(grad, inverse.view(-1, ctx.copies), None), None, None, None


def replicate_permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
    """Rows `x[order // copies]`: each of the T rows of x appears `copies` times, in the order given by the permutation
    `order` of range(T * copies); `inverse` is the inverse permutation of `order`."""
    return _ReplicatePermute.apply(x, order, inverse, copies)


class _WeightedGatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, index_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_RH, index_TK, weight_TK)
        return _gather_sum(rows_RH, index_TK, weight_TK)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        rows_RH, index_TK, weight_TK = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        if use_triton(rows_RH):
            from framework.ops.triton_kernels import gather_sum_backward  # noqa: PLC0415
            grad_rows, grad_weight = gather_sum_backward(grad_TH, rows_RH.contiguous(), index_TK.contiguous(),
                                                         weight_TK.contiguous())
            return grad_rows, None, grad_weight
        tokens, k = index_TK.shape
        flat = index_TK.reshape(-1)
        slots_TKH = rows_RH.index_select(0, flat).view(tokens, k, -1)
        grad_weight = torch.bmm(slots_TKH, grad_TH.unsqueeze(-1).to(slots_TKH.dtype)).squeeze(-1)
        grad_slots = (weight_TK.unsqueeze(-1).to(grad_TH.dtype) * grad_TH.unsqueeze(1)).reshape(tokens * k, -1)
        grad_rows = torch.empty_like(rows_RH).index_copy_(0, flat, grad_slots)
        return grad_rows, None, grad_weight.to(weight_TK.dtype)


def weighted_gather_sum(rows_RH: torch.Tensor, index_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_k weight[t, k] * rows[index[t, k]], where `index` is a permutation of range(R) laid out
    [T, K]. Gradients flow to rows and weight."""
    return _WeightedGatherSum.apply(rows_RH, index_TK, weight_TK)
