"""Local (single-rank) token dispatch: expert-sorted rows out, weighted token sums back.

Legend: T tokens, H hidden, E experts, K top-k, R = T*K routed rows.
Owns: permuting each token's K copies into expert order (`dispatch`) and reversing it with the routing weights
(`combine`). The metadata `dispatch` returns is the only state `combine` uses. Expert-parallel routing across ranks
lives in framework/parallel; it keeps the same contract (`route`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from framework.moe.router import Routing
from framework.ops.expert_sort import expand_by_expert
from framework.ops.permute import weighted_gather_sum


# rows [R, H] grouped by expert, cumulative row ends per expert [E] (int32, framework/ops/expert_sort.group_ends)
# -> expert outputs [R, H]
Experts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SortedMeta(NamedTuple):
    """TorchDispatcher's metadata for combine."""

    inverse_TK: torch.Tensor  # slot (t, k) became dispatched row inverse_TK[t, k]
    weights_TK: torch.Tensor  # combine weights


class MegablocksMeta(NamedTuple):
    """MegablocksDispatcher's metadata for combine: MegaBlocks' sort indices and bins."""

    indices_R: torch.Tensor  # flat (token, k) slot of each dispatched row
    bin_ids_R: torch.Tensor
    bins_E: torch.Tensor
    weights_TK: torch.Tensor  # combine weights


class Dispatcher(Protocol):
    def route(self, x_TH: torch.Tensor, routing: Routing, num_experts: int, experts: Experts) -> torch.Tensor:
        """[T, H]: for each token, the routing-weighted sum of its K experts' outputs, `experts` called on rows
        grouped by expert with their cumulative row ends per expert (int32, on the device)."""


class LocalDispatcher:
    """Tokens and experts on this process: one `dispatch`, the experts, one `combine`."""

    def route(self, x_TH, routing, num_experts, experts):
        rows_RH, group_ends_E, meta = self.dispatch(x_TH, routing, num_experts)
        return self.combine(experts(rows_RH, group_ends_E), meta)

    def dispatch(self, x_TH: torch.Tensor, routing: Routing,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, NamedTuple]:
        """Rows [R, H] grouped by expert, their cumulative row ends per expert [E] (int32, on device), this
        dispatcher's metadata for combine."""
        raise NotImplementedError

    def combine(self, rows_RH: torch.Tensor, meta: NamedTuple) -> torch.Tensor:
        """[T, H]: for each token, the routing-weighted sum of its K expert outputs."""
        raise NotImplementedError


class TorchDispatcher(LocalDispatcher):
    """A stable sort of the slots by expert fused with the row copy (framework/ops/expert_sort.py), then gathers
    back (no atomics); the weighted K-way sum of combine and of dispatch's backward is one Triton kernel on CUDA
    (framework/ops/permute.py), torch elsewhere."""

    def dispatch(self, x_TH, routing, num_experts):
        rows, inverse_TK, ends = expand_by_expert(x_TH, routing.expert_ids, num_experts)
        return rows, ends, SortedMeta(inverse_TK, routing.weights)

    def combine(self, rows_RH, meta):
        return weighted_gather_sum(rows_RH, meta.inverse_TK, meta.weights_TK)


class MegablocksDispatcher(LocalDispatcher):
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
        return rows, bins.to(torch.int32), MegablocksMeta(indices, bin_ids, bins, routing.weights)

    def combine(self, rows_RH, meta):
        top_k = meta.weights_TK.shape[-1]
        weights = meta.weights_TK.reshape(-1).to(rows_RH.dtype)
        return self._ops.scatter(rows_RH, meta.indices_R, meta.bin_ids_R, weights, meta.bins_E, top_k)
