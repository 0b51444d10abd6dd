"""The row expansion / K-way gather-sum pair that dispatch and combine are made of.

Legend: T source rows (tokens), J slots per source row (top-k, or EP ranks), R expanded rows, H hidden.
An expansion copies source rows into R rows (`out[r] = x[src[r]]`), each row from exactly one slot of one source row;
`index[t, j]` names the row that slot j of source row t became, or R for an empty slot (a "hole": a token routed to
fewer than J places, as when expert parallelism sends a token to some ranks only). The gather-sum is the transpose:
`out[t] = sum_j w[t, j] * rows[index[t, j]]`, holes adding nothing. So each is the other's backward, no atomics, and on
CUDA each direction is one Triton kernel reading every row once (framework/ops/triton_kernels.py), where eager torch
would gather into a [T, J, H] temporary and reduce it.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton


def _slots(rows_RH: torch.Tensor, index_TJ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, J, H] copies of the indexed rows (zeros at holes) and the [T, J] mask of real slots: the torch path."""
    tokens, slots = index_TJ.shape
    valid = index_TJ < rows_RH.shape[0]
    if rows_RH.shape[0] == 0:
        return rows_RH.new_zeros(tokens, slots, rows_RH.shape[1]), valid
    gathered = rows_RH.index_select(0, index_TJ.clamp_max(rows_RH.shape[0] - 1).reshape(-1))
    return gathered.view(tokens, slots, rows_RH.shape[1]) * valid.unsqueeze(-1).to(rows_RH.dtype), valid


def sum_rows(rows_RH: torch.Tensor, index_TJ: torch.Tensor, weight_TJ: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j weight[t, j] * rows[index[t, j]] (weight None: plain sum; holes skipped). No autograd."""
    if use_triton(rows_RH):
        from framework.ops.triton_kernels import gather_sum_forward  # noqa: PLC0415
        return gather_sum_forward(rows_RH.contiguous(), index_TJ.contiguous(),
                                  None if weight_TJ is None else weight_TJ.contiguous())
    slots_TJH, _ = _slots(rows_RH, index_TJ)
    if weight_TJ is None:
        return slots_TJH.sum(1)
    return torch.bmm(weight_TJ.unsqueeze(1).to(slots_TJH.dtype), slots_TJH).squeeze(1)


class _ExpandRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src_R: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index_TJ)
        return x.index_select(0, src_R)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index_TJ,) = ctx.saved_tensors
        return sum_rows(grad, index_TJ, None), None, None


def expand_rows(x_TH: torch.Tensor, src_R: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
    """Rows `x[src]`, where `index` [T, J] lists for each row t of x the output rows copied from it (R = none)."""
    return _ExpandRows.apply(x_TH, src_R, index_TJ)


class _WeightedGatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, index_TJ: torch.Tensor, weight_TJ: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows_RH, index_TJ, weight_TJ)
        return sum_rows(rows_RH, index_TJ, weight_TJ)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        rows_RH, index_TJ, weight_TJ = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        if use_triton(rows_RH):
            from framework.ops.triton_kernels import gather_sum_backward  # noqa: PLC0415
            grad_rows, grad_weight = gather_sum_backward(grad_TH, rows_RH.contiguous(), index_TJ.contiguous(),
                                                         weight_TJ.contiguous())
            return grad_rows, None, grad_weight
        tokens, slots = index_TJ.shape
        slots_TJH, valid = _slots(rows_RH, index_TJ)
        grad_weight = torch.bmm(slots_TJH, grad_TH.unsqueeze(-1).to(slots_TJH.dtype)).squeeze(-1)
        grad_slots = weight_TJ.unsqueeze(-1).to(grad_TH.dtype) * grad_TH.unsqueeze(1)
        grad_slots = grad_slots.reshape(tokens * slots, grad_TH.shape[1])
        # One spare row catches every hole (written many times, then dropped); real rows are written exactly once.
        grad_rows = rows_RH.new_empty(rows_RH.shape[0] + 1, rows_RH.shape[1])
        grad_rows.index_copy_(0, index_TJ.reshape(-1).clamp_max(rows_RH.shape[0]), grad_slots)
        return grad_rows[:-1], None, (grad_weight * valid).to(weight_TJ.dtype)


def weighted_gather_sum(rows_RH: torch.Tensor, index_TJ: torch.Tensor, weight_TJ: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_j weight[t, j] * rows[index[t, j]]; every row is named by exactly one slot, index R marks
    a hole. Gradients flow to rows and weight."""
    return _WeightedGatherSum.apply(rows_RH, index_TJ, weight_TJ)


def gather_sum(rows_RH: torch.Tensor, index_TJ: torch.Tensor, src_R: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_j rows[index[t, j]], the transpose of `expand_rows(x, src, index)` (its backward is that
    expansion of the gradient); holes as there."""
    return _GatherSum.apply(rows_RH, index_TJ, src_R)


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, index_TJ: torch.Tensor, src_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(src_R)
        return sum_rows(rows_RH, index_TJ, None)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        (src_R,) = ctx.saved_tensors
        return grad_TH.index_select(0, src_R), None, None
