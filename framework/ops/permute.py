"""The row expansion / K-way gather-sum pair that dispatch and combine are made of.

Legend: T source rows (tokens), J slots per source row (top-k, or EP ranks), R expanded rows, H hidden.
An expansion copies source rows into R rows (`out[r] = x[src[r]]`), each row from exactly one slot of one source row;
`index[t, j]` names the row that slot j of source row t became, or R for an empty slot (a "hole": a token routed to
fewer than J places, as when expert parallelism sends a token to some ranks only). The gather-sum is the transpose:
`out[t] = sum_j rows[index[t, j]]`, holes adding nothing. So each is the other's backward, no atomics, and on
CUDA each direction is one Triton kernel reading every row once (framework/ops/triton_kernels.py), where eager torch
would gather into a [T, J, H] temporary and reduce it.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton


def sum_rows(rows_RH: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j rows[index[t, j]], holes skipped. No autograd."""
    if use_triton(rows_RH):
        from framework.ops.triton_kernels import gather_sum as gather_sum_kernel  # noqa: PLC0415
        return gather_sum_kernel(rows_RH.contiguous(), index_TJ.contiguous())
    tokens, slots = index_TJ.shape
    if rows_RH.shape[0] == 0:
        return rows_RH.new_zeros(tokens, rows_RH.shape[1])
    valid = (index_TJ < rows_RH.shape[0]).unsqueeze(-1).to(rows_RH.dtype)
    gathered = rows_RH.index_select(0, index_TJ.clamp_max(rows_RH.shape[0] - 1).reshape(-1))
    return (gathered.view(tokens, slots, rows_RH.shape[1]) * valid).sum(1)


def spread_rows(x_TH: torch.Tensor, index_TJ: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows, H]: rows[index[t, j]] = x[t], holes skipped; every row is named by exactly one slot. No autograd."""
    if use_triton(x_TH):
        from framework.ops.triton_kernels import spread_rows as spread_kernel  # noqa: PLC0415
        return spread_kernel(x_TH.contiguous(), index_TJ.contiguous(), n_rows)
    tokens, slots = index_TJ.shape
    # One spare row catches every hole (written many times, then dropped); real rows are written exactly once.
    rows = x_TH.new_empty(n_rows + 1, x_TH.shape[1])
    rows.index_copy_(0, index_TJ.reshape(-1).clamp_max(n_rows),
                     x_TH.unsqueeze(1).expand(tokens, slots, x_TH.shape[1]).reshape(tokens * slots, x_TH.shape[1]))
    return rows[:-1]


class _ExpandRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src_R: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index_TJ)
        return x.index_select(0, src_R)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index_TJ,) = ctx.saved_tensors
        return sum_rows(grad, index_TJ), None, None


def expand_rows(x_TH: torch.Tensor, src_R: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
    """Rows `x[src]`, where `index` [T, J] lists for each row t of x the output rows copied from it (R = none)."""
    return _ExpandRows.apply(x_TH, src_R, index_TJ)


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index_TJ)
        ctx.n_rows = rows_RH.shape[0]
        return sum_rows(rows_RH, index_TJ)

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        (index_TJ,) = ctx.saved_tensors
        return spread_rows(grad_TH, index_TJ, ctx.n_rows), None


def gather_sum(rows_RH: torch.Tensor, index_TJ: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_j rows[index[t, j]], the transpose of an expansion; every row is named by exactly one
    slot, index R marks a hole. Its backward copies each token's gradient to its rows, reading no row: nothing
    [R, H] is kept from the forward (the routing weights are applied before the experts' second GEMM,
    framework/ops/swiglu.py)."""
    return _GatherSum.apply(rows_RH, index_TJ)
