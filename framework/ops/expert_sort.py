"""Routed slots sorted by expert: the local (single-rank) dispatcher's rows and metadata.

Legend: T tokens, H hidden, K top-k (slots per token), R = T*K slots, E experts.
The rows per expert leave as cumulative row ends (int32, `torch._grouped_mm`'s `offs`): the counting sort has them
anyway, and the grouped GEMM would otherwise spend a cast and a scan of its own on them (PERF_NOTES change 24).
On CUDA `expand_by_expert` is two Triton launches (framework/ops/triton_kernels.py): a stable counting sort whose
second pass also copies each slot's token row and routing weight to its sorted place. Eager torch needs a radix
argsort, an arange and a scatter for the inverse, a scatter_add for the counts and index_selects, each a launch of its
own, and the host cost of those launches paced the layer at 4,096 tokens (benchmarks/PERF_NOTES.md, changes 13 and
26). The torch path below is the CPU path and the kernels' reference.
"""

from __future__ import annotations

import torch

from framework.ops.permute import sum_rows
from framework.ops.triton_available import use_triton


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 counts of each expert id in `expert_ids` (any shape)."""
    # scatter_add rather than bincount: bincount reads the max on the host (a device sync) on CUDA.
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert_reference(ids_TK: torch.Tensor, num_experts: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    src = torch.div(order, ids_TK.shape[-1], rounding_mode="floor")
    return src, inverse, group_ends(tokens_per_expert(flat, num_experts))


def group_ends(counts_E: torch.Tensor) -> torch.Tensor:
    """[..., E] int32 cumulative row ends of experts with `counts_E` rows each: expert e's rows are
    ends[e] - counts[e] .. ends[e] - 1 (the `offs` of torch._grouped_mm)."""
    return counts_E.cumsum(-1, dtype=torch.int32)


def group_counts(ends_E: torch.Tensor) -> torch.Tensor:
    """[E] rows per expert, int64 on the ends' device, from `group_ends`' output."""
    ends = ends_E.to(torch.int64)
    return torch.diff(ends, prepend=ends.new_zeros(1))


class _ExpandByExpert(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int):
        if use_triton(x_TH) and ids_TK.numel():
            from framework.ops.triton_kernels import expand_by_expert as expand_kernel  # noqa: PLC0415
            rows, row_weights, inverse_TK, ends = expand_kernel(x_TH.contiguous(), ids_TK.contiguous(),
                                                                weights_TK.contiguous(), num_experts)
        else:
            src, inverse, ends = sort_by_expert_reference(ids_TK, num_experts)
            rows, inverse_TK = x_TH.index_select(0, src), inverse.view(ids_TK.shape)
            row_weights = weights_TK.new_empty(inverse.numel()).index_copy_(0, inverse, weights_TK.reshape(-1))
        ctx.save_for_backward(inverse_TK)
        ctx.mark_non_differentiable(inverse_TK, ends)
        return rows, row_weights, inverse_TK, ends

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor | None, grad_row_weights: torch.Tensor | None, _inverse, _ends):
        (inverse_TK,) = ctx.saved_tensors
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0] and grad_rows is not None:
            grad_x = sum_rows(grad_rows, inverse_TK)
        if ctx.needs_input_grad[2] and grad_row_weights is not None:
            grad_weights = grad_row_weights.index_select(0, inverse_TK.reshape(-1)).view(inverse_TK.shape)
        return grad_x, None, grad_weights, None


def expand_by_expert(x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token t's row copied once for each of its slots (t, k) of `ids_TK` [T, K] (int64 expert ids in [0, E)), the
    copies sorted stably by expert: (rows [R, H], differentiable in x; row weights [R], slot (t, k)'s weight
    `weights_TK[t, k]` at its row, differentiable in the weights; inverse [T, K] int64, the row slot (t, k) became;
    ends [E] int32, the cumulative row ends per expert, `group_ends`)."""
    return _ExpandByExpert.apply(x_TH, ids_TK, weights_TK, num_experts)
