"""Dropless token dispatch across the expert-parallel group (the `Dispatcher` contract of framework/moe/dispatch.py).

Legend: T local tokens, H hidden, E global experts, e = E/ep local experts, K top-k, R = T*K local rows,
Q rows received from the EP group.
Flow: sort local rows by global expert -> exchange counts -> all-to-all rows to the ranks that own the experts ->
regroup received rows (source-rank-major) by local expert -> experts -> reverse all of it -> weighted combine.
Host syncs: exactly one per layer and direction, the `.tolist()` of the exchanged counts that all_to_all_single needs
as split sizes (the backward pass reuses them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from framework.moe.dispatch import DispatchMeta, TorchDispatcher
from framework.ops.permute import permute_rows
from framework.parallel.all_to_all import all_to_all


class EPMeta(NamedTuple):
    local: DispatchMeta  # the local sort by global expert, undone by TorchDispatcher.combine
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    regroup_Q: torch.Tensor  # received row order -> local-expert-major order
    regroup_inverse_Q: torch.Tensor


class AllToAllDispatcher:
    def __init__(self, ep_group, ep_size: int, num_experts: int):
        self.group = ep_group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size
        self._local = TorchDispatcher()

    def dispatch(self, x_TH, routing, num_experts):
        rows_RH, counts_E, local_meta = self._local.dispatch(x_TH, routing, num_experts)
        # recv_counts[r, j]: rows rank r sends to my local expert j.
        send_counts = counts_E.view(self.ep_size, self.num_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits
        recv_RH = all_to_all(rows_RH, recv_splits, send_splits, self.group)

        # Received rows are grouped by source rank, then local expert: regroup them expert-major (stable).
        local_ids_Q = torch.arange(self.num_local, device=x_TH.device).repeat(self.ep_size)
        local_ids_Q = local_ids_Q.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_splits))
        regroup = torch.argsort(local_ids_Q, stable=True)
        regroup_inv = torch.empty_like(regroup).scatter_(0, regroup, torch.arange(regroup.numel(),
                                                                                  device=regroup.device))
        rows_QH = permute_rows(recv_RH, regroup, regroup_inv)
        meta = EPMeta(local_meta, send_splits, recv_splits, regroup, regroup_inv)
        return rows_QH, recv_counts.sum(0), meta

    def combine(self, rows_QH, meta: EPMeta):
        back_QH = permute_rows(rows_QH, meta.regroup_inverse_Q, meta.regroup_Q)
        rows_RH = all_to_all(back_QH, meta.send_splits, meta.recv_splits, self.group)
        return self._local.combine(rows_RH, meta.local)
