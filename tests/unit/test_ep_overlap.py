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

    def experts(rows, ends, weights):
        assert ends.dtype == torch.int32 and int(ends[-1]) == rows.shape[0] == weights.shape[0]
        return _Logged.apply(rows, log, next(calls)) * weights.unsqueeze(-1)

    y = AllToAllDispatcher(group, 1, E, chunks=chunks).route(router(x), E, experts)
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


def test_recomputation_reuses_the_count_exchange(group, monkeypatch):
    """Under the decoder's checkpoints (framework/models/recompute.py), recomputing an EP MoE layer in the backward
    reuses the first run's exchanged counts: one count exchange and one host sync per layer and step instead of two,
    with the gradients of no checkpoint. A recomputation that routed differently stops with a clear error."""
    from torch.utils.checkpoint import checkpoint

    from framework.models.recompute import checkpoint_contexts

    exchanges = []
    real = dist.all_to_all_single

    def counted(out, inp, *args, **kwargs):
        exchanges.append("counts" if inp.dtype == torch.int64 else "rows")
        return real(out, inp, *args, **kwargs)

    monkeypatch.setattr(dist, "all_to_all_single", counted)
    torch.manual_seed(0)
    router = TopKRouter(H, E, K, True)
    torch.nn.init.normal_(router.weight)
    dispatcher = AllToAllDispatcher(group, 1, E, chunks=2)

    def layer(x):
        return dispatcher.route(router(x), E, lambda rows, ends, weights: rows * 2.0 * weights.unsqueeze(-1))

    grads = []
    for recompute in (False, True):
        exchanges.clear()
        x = torch.randn(9, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = checkpoint(layer, x, use_reentrant=False, context_fn=checkpoint_contexts) if recompute else layer(x)
        y.square().sum().backward()
        grads.append((x.grad, router.weight.grad.clone()))
        router.weight.grad = None
        assert exchanges.count("counts") == 1, (recompute, exchanges)
        # rows and slots out, returns back: 2 chunks x 3 exchanges forward, again in the recomputation, and reversed
        assert exchanges.count("rows") == (18 if recompute else 12), (recompute, exchanges)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)

    flip = {"calls": 0}

    def routed_differently(x):
        flip["calls"] += 1
        routing = router(x)
        if flip["calls"] == 2:  # the recomputation: another expert for token 0's first slot
            ids = routing.expert_ids.clone()
            ids[0, 0] = (ids[0, 0] + 1) % E if (ids[0, 1] != (ids[0, 0] + 1) % E) else (ids[0, 0] + 2) % E
            routing = routing._replace(expert_ids=ids)
        return dispatcher.route(routing, E, lambda rows, ends, weights: rows * 2.0 * weights.unsqueeze(-1))

    x = torch.randn(9, H, requires_grad=True)
    y = checkpoint(routed_differently, x, use_reentrant=False, context_fn=checkpoint_contexts)
    with pytest.raises(RuntimeError, match="routed differently from its first run"):
        y.square().sum().backward()
