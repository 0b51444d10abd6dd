"""Local (single-rank) token dispatch: expert-sorted rows out, weighted token sums back.

Legend: T tokens, H hidden, E experts, K top-k, R = T*K routed rows.
Owns: permuting each token's K copies into expert order (`dispatch`) and reversing it with the routing weights
(`combine`). The metadata `dispatch` returns is the only state `combine` uses. Expert-parallel dispatch across ranks
lives in framework/parallel; it keeps the same contract.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from framework.moe.router import Routing
from framework.ops.permute import replicate_permute_rows, weighted_gather_sum


class DispatchMeta(NamedTuple):
    order_R: torch.Tensor  # row r of the dispatched rows is flat (token, k) slot order_R[r]
    inverse_R: torch.Tensor  # inverse permutation of order_R
    weights_TK: torch.Tensor  # combine weights
    extra: tuple = ()  # backend-specific indices (megablocks bins)


class Dispatcher(Protocol):
    def dispatch(self, x_TH: torch.Tensor, routing: Routing,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """Rows [R, H] grouped by expert, tokens per expert [E] (int, on device), metadata for combine."""

    def combine(self, rows_RH: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """[T, H]: for each token, the routing-weighted sum of its K expert outputs."""


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add rather than bincount: bincount reads the max on the host (a device sync) on CUDA.
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class TorchDispatcher:
    """Stable argsort by expert, then gathers in both directions (no atomics); the weighted K-way sum of combine and
    of dispatch's backward is one Triton kernel on CUDA (framework/ops/permute.py), torch elsewhere."""

    def dispatch(self, x_TH, routing, num_experts):
        top_k = routing.expert_ids.shape[-1]
        flat_ids = routing.expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        rows = replicate_permute_rows(x_TH, order, inverse, top_k)
        return rows, tokens_per_expert(flat_ids, num_experts), DispatchMeta(order, inverse, routing.weights)

    def combine(self, rows_RH, meta):
        num_tokens, top_k = meta.weights_TK.shape
        return weighted_gather_sum(rows_RH, meta.inverse_R.view(num_tokens, top_k), meta.weights_TK)


class MegablocksDispatcher:
    """MegaBlocks' CUDA sort/histogram/cumsum and Triton gather/scatter (scatter applies the weights in-kernel)."""

    def __init__(self, num_experts: int):
        from megablocks import ops  # noqa: PLC0415 - CUDA-only import, checked at backend resolution

        self._ops = ops
        self._end_bit = max(int(num_experts - 1).bit_length(), 1)

    def dispatch(self, x_TH, routing, num_experts):
        ops = self._ops
        top_k = routing.expert_ids.shape[-1]
        with torch.no_grad():
            flat_ids = routing.expert_ids.reshape(-1).int()
            bin_ids, indices = ops.sort(flat_ids, self._end_bit)
            counts = ops.histogram(flat_ids, num_experts)
            bins = ops.inclusive_cumsum(counts, 0)
            bins = bins.view(1) if bins.dim() == 0 else bins
        rows = ops.gather(x_TH.contiguous(), indices, bin_ids, bins, top_k)
        return rows, counts, DispatchMeta(indices, indices, routing.weights, (bin_ids, bins))

    def combine(self, rows_RH, meta):
        bin_ids, bins = meta.extra
        top_k = meta.weights_TK.shape[-1]
        weights = meta.weights_TK.reshape(-1).to(rows_RH.dtype)
        return self._ops.scatter(rows_RH, meta.order_R, bin_ids, weights, bins, top_k)
