"""Local (single-rank) token dispatch: expert-sorted rows out, token sums back.

Legend: T tokens, H hidden, E experts, K top-k, R = T*K routed rows.
Owns: permuting each token's K copies into expert order with their routing weights (`dispatch`) and summing each
token's K expert outputs back (`combine`). The experts apply the weights before their second GEMM
(framework/ops/swiglu.py), so the combine is a plain sum that keeps no [R, H] tensor for its backward. The metadata
`dispatch` returns is the only state `combine` uses. Expert-parallel routing across ranks lives in
framework/parallel; it keeps the same contract (`route`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from framework.moe.router import Routing
from framework.ops.expert_sort import expand_by_expert
from framework.ops.permute import gather_sum


# rows [R, H] grouped by expert, cumulative row ends per expert [E] (int32, framework/ops/expert_sort.group_ends),
# each row's routing weight [R] or None -> expert outputs [R, H], scaled by the weights when given
Experts = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class SortedMeta(NamedTuple):
    """TorchDispatcher's metadata for combine."""

    inverse_TK: torch.Tensor  # slot (t, k) became dispatched row inverse_TK[t, k]


class MegablocksMeta(NamedTuple):
    """MegablocksDispatcher's metadata for combine: MegaBlocks' sort indices and bins."""

    indices_R: torch.Tensor  # flat (token, k) slot of each dispatched row
    bin_ids_R: torch.Tensor
    bins_E: torch.Tensor
    weights_TK: torch.Tensor  # combine weights


class Dispatcher(Protocol):
    def route(self, routing: Routing, num_experts: int, experts: Experts) -> torch.Tensor:
        """[T, H]: for each of `routing.tokens`, the routing-weighted sum of its K experts' outputs, `experts` called
        on rows grouped by expert with their cumulative row ends per expert (int32, on the device) and each row's
        routing weight (or None when the dispatcher applies the weights itself). The tokens are read from the routing,
        not passed beside it, so that the router's backward receives the dispatch's x-gradient (router.py)."""


class LocalDispatcher:
    """Tokens and experts on this process: one `dispatch`, the experts, one `combine`."""

    def route(self, routing, num_experts, experts):
        rows_RH, group_ends_E, weights_R, meta = self.dispatch(routing, num_experts)
        return self.combine(experts(rows_RH, group_ends_E, weights_R), meta)

    def dispatch(self, routing: Routing, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, NamedTuple]:
        """`routing.tokens` as rows [R, H] grouped by expert, their cumulative row ends per expert [E] (int32, on
        device), each row's routing weight for the experts to apply (None: `combine` applies them), this dispatcher's
        metadata for combine."""
        raise NotImplementedError

    def combine(self, rows_RH: torch.Tensor, meta: NamedTuple) -> torch.Tensor:
        """[T, H]: for each token, the sum of its K (routing-weighted) expert outputs."""
        raise NotImplementedError


class TorchDispatcher(LocalDispatcher):
    """A stable sort of the slots by expert fused with the copy of their rows and weights
    (framework/ops/expert_sort.py), then gathers back (no atomics); the K-way sum of combine and of dispatch's
    backward is one Triton kernel on CUDA (framework/ops/permute.py), torch elsewhere."""

    def dispatch(self, routing, num_experts):
        rows, weights_R, inverse_TK, ends = expand_by_expert(routing.tokens, routing.expert_ids, routing.weights,
                                                             num_experts)
        return rows, ends, weights_R, SortedMeta(inverse_TK)

    def combine(self, rows_RH, meta):
        return gather_sum(rows_RH, meta.inverse_TK)


class MegablocksDispatcher(LocalDispatcher):
    """MegaBlocks' CUDA sort/histogram/cumsum and Triton gather/scatter, as its dMoE uses them: its scatter applies
    the routing weights, so the experts get none."""

    def __init__(self, num_experts: int):
        from megablocks import ops  # noqa: PLC0415 - CUDA-only import, checked at backend resolution

        self._ops = ops
        self._end_bit = max(int(num_experts - 1).bit_length(), 1)

    def dispatch(self, routing, num_experts):
        ops = self._ops
        top_k = routing.expert_ids.shape[-1]
        with torch.no_grad():
            flat_ids = routing.expert_ids.reshape(-1).int()
            bin_ids, indices = ops.sort(flat_ids, self._end_bit)
            counts = ops.histogram(flat_ids, num_experts)
            bins = ops.inclusive_cumsum(counts, 0)
            bins = bins.view(1) if bins.dim() == 0 else bins
        rows = ops.gather(routing.tokens.contiguous(), indices, bin_ids, bins, top_k)
        return rows, bins.to(torch.int32), None, MegablocksMeta(indices, bin_ids, bins, routing.weights)

    def combine(self, rows_RH, meta):
        top_k = meta.weights_TK.shape[-1]
        weights = meta.weights_TK.reshape(-1).to(rows_RH.dtype)
        return self._ops.scatter(rows_RH, meta.indices_R, meta.bin_ids_R, weights, meta.bins_E, top_k)
