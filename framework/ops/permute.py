"""Row permutations with cheap backward passes.

`x[index]` in autograd backpropagates through an accumulating scatter (atomics). When `index` is a permutation, or a
replication of each row a fixed number of times, the backward is itself a gather, which is faster and deterministic.
"""

from __future__ import annotations

import torch


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


class _ReplicatePermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, torch.div(order, copies, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_rows = grad.index_select(0, inverse)
        return grad_rows.view(-1, ctx.copies, grad.shape[-1]).sum(1), None, None, None


def replicate_permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
    """Rows `x[order // copies]`: each of the T rows of x appears `copies` times, in the order given by the permutation
    `order` of range(T * copies); `inverse` is the inverse permutation of `order`."""
    return _ReplicatePermute.apply(x, order, inverse, copies)
