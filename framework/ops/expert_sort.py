"""Routed slots sorted by expert: the dispatch metadata of the local (single-rank) dispatcher.

Legend: T tokens, K top-k (slots per token), R = T*K slots, E experts.
The rows per expert leave as cumulative row ends (int32, `torch._grouped_mm`'s `offs`): the counting sort has them
anyway, and the grouped GEMM would otherwise spend a cast and a scan of its own on them (PERF_NOTES change 24).
On CUDA one stable counting sort (two Triton kernels and an int32 cumsum, framework/ops/triton_kernels.py) gives the
three outputs at once; eager torch needs a radix argsort, an arange and a scatter for the inverse, and a scatter_add
for the counts, each a launch of its own, and the host cost of those launches paced the layer at 4,096 tokens
(benchmarks/PERF_NOTES.md, change 13). The torch path below is the CPU path and the kernels' reference.
"""

from __future__ import annotations

import torch

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


def sort_by_expert(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot (t, k) of `ids_TK` [T, K] (int64 expert ids in [0, E)) sorted stably by expert: (src [R] int64, the token
    each sorted row copies; inverse [R] int64, the sorted row of flat slot t*K + k; ends [E] int32, the cumulative
    row ends per expert, `group_ends`)."""
    if use_triton(ids_TK) and ids_TK.numel():
        from framework.ops.triton_kernels import sort_by_expert as sort_kernel  # noqa: PLC0415
        return sort_kernel(ids_TK.reshape(-1).contiguous(), num_experts, ids_TK.shape[-1])
    return sort_by_expert_reference(ids_TK, num_experts)
