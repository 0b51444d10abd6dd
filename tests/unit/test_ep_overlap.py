"""The schedule that parallel.ep_chunks relies on, checked in one process (gloo, a group of one): which exchanges are
issued before which chunk's expert work, forward and backward. Values across ranks are test_ep_block's and
test_ep_zero's; this file checks the order that lets the exchanges overlap compute on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from framework.moe.router import TopKRouter
from framework.parallel import all_to_all
from framework.parallel.ep_dispatch import AllToAllDispatcher, _spans

H, E, K = 8, 4, 2


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this pytest process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class _Logged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, log, chunk):
        ctx.log, ctx.chunk = log, chunk
        log.append(f"experts{chunk}")
        return rows * 2.0

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(f"experts{ctx.chunk}^T")
        return grad * 2.0, None, None


def _run(group, chunks: int, monkeypatch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    log: list[str] = []
    issue = all_to_all.Exchange.issue

    def logged_issue(self, x, reverse):
        log.append("exchange^T" if reverse else "exchange")
        return issue(self, x, reverse)

    monkeypatch.setattr(all_to_all.Exchange, "issue", logged_issue)
    torch.manual_seed(0)
    router = TopKRouter(H, E, K, True)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(7, H, requires_grad=True)
    calls = iter(range(chunks))

    def experts(rows, counts):
        assert int(counts.sum()) == rows.shape[0]
        return _Logged.apply(rows, log, next(calls))

    y = AllToAllDispatcher(group, 1, E, chunks=chunks).route(x, router(x), E, experts)
    log.append("backward")
    y.square().sum().backward()
    monkeypatch.undo()
    return log, y.detach(), x.grad


def test_two_chunks_overlap_forward_and_backward(group, monkeypatch):
    log, y, grad = _run(group, 2, monkeypatch)
    # forward: both chunks' rows (and their slots) leave before any expert runs; chunk 0 sends its outputs back
    # before chunk 1 computes
    # backward: both reverse returns are issued before chunk 1's expert backward, and chunk 1's reverse dispatch
    # (rows and slots) before chunk 0's expert backward, so each exchange has a chunk's expert work to hide behind
    assert log == ["exchange"] * 4 + ["experts0", "exchange", "experts1", "exchange", "backward",
                                      "exchange^T", "exchange^T", "experts1^T", "exchange^T", "exchange^T",
                                      "experts0^T", "exchange^T", "exchange^T"], log
    ref_log, ref_y, ref_grad = _run(group, 1, monkeypatch)
    assert ref_log == ["exchange", "exchange", "experts0", "exchange", "backward", "exchange^T", "experts0^T",
                       "exchange^T", "exchange^T"], ref_log
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_spans_cover_the_tokens_in_order():
    assert _spans(7, 2) == [(0, 3), (3, 7)]
    assert _spans(2, 4) == [(0, 1), (1, 2)]  # no empty chunk: fewer chunks than asked
    assert _spans(0, 3) == [(0, 0)]
