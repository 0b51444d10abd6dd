"""Variable-split all-to-all with autograd: the backward pass is the reverse exchange.

`all_to_all_start` / `all_to_all_wait` split one exchange in two so that work issued between them runs while the
rows travel (NCCL: on its own stream; the wait makes the current stream, not the host, wait). Their backward is
split the same way, reversed: the wait's backward issues the reverse exchange and the start's backward waits for it,
so the gradient work autograd runs between those two nodes overlaps it. Which work that is follows from autograd's
order: of the nodes ready to run, the one created last in the forward runs first (framework/parallel/ep_dispatch.py
orders its chunks by that rule).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Exchange:
    """One exchange in flight: its splits and the pending collective of the forward, then of the backward."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = None
        self.grad_work = None
        self.grad_in = None  # the reverse exchange's buffer: the gradient of the start's input once grad_work is done

    def issue(self, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        out_splits, in_splits = (self.in_splits, self.out_splits) if reverse else (self.out_splits, self.in_splits)
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group, async_op=True)
        if reverse:
            self.grad_work, self.grad_in = work, out
        else:
            self.work = work
        return out


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange: Exchange):
        ctx.exchange = exchange
        return exchange.issue(x, reverse=False)

    @staticmethod
    def backward(ctx, grad_out):
        # grad_out was sent back by the reverse exchange that _Wait.backward issued; its result is the gradient here
        exchange = ctx.exchange
        exchange.grad_work.wait()
        grad_in, exchange.grad_work, exchange.grad_in = exchange.grad_in, None, None
        return grad_in, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, exchange: Exchange):
        exchange.work.wait()
        exchange.work = None
        ctx.exchange = exchange
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.exchange.issue(grad, reverse=True)
        return grad, None  # on to _Start.backward, which returns the exchange's result instead


def all_to_all_start(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group
                     ) -> tuple[torch.Tensor, Exchange]:
    """Send rows in_splits[r] of `x` to rank r of `group`, receiving out_splits[r] rows from rank r: the receive
    buffer (not to be read before `all_to_all_wait`) and the exchange in flight."""
    exchange = Exchange(out_splits, in_splits, group)
    return _Start.apply(x, exchange), exchange


def all_to_all_wait(out: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """The received rows of an exchange from `all_to_all_start`, once they have arrived."""
    return _Wait.apply(out, exchange)
