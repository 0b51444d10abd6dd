"""Dropless token routing across the expert-parallel group (the `Dispatcher` contract of framework/moe/dispatch.py).

Legend: T local tokens, H hidden, E global experts, e = E/ep local experts, K top-k, P (token, rank) pairs sent,
Pr pairs received, Q (received pair, local expert) rows computed here, C token chunks.
A token goes to each EP rank that holds at least one of its K experts once, not once per expert (top-8 of 128 experts
on 4 ranks reaches 3.6 ranks on average: 2.2x fewer rows on the wire than one per expert), with its K local expert ids
and routing weights (-1 / 0 where the expert lives elsewhere). The receiver expands each pair into one row per local
expert, sorted by expert, with its routing weight, runs the experts (which apply the weights before their second
GEMM), and sums each pair's outputs before the return trip; the sender sums the returned pair rows per token. All
four moves are framework/ops/permute.py's expansion / gather-sum pair.

With `chunks` C > 1 the tokens are cut into C contiguous chunks that go through that pipeline one after another, so
that a chunk's exchanges run while another chunk's experts compute: in the forward every chunk's rows leave first,
then each chunk computes and sends its outputs back while the next chunk's rows are still arriving. The backward is
the mirror image without extra code: each exchange is a start / wait pair (framework/parallel/all_to_all.py), and
because autograd runs, of the ready nodes, the one created last first, creating chunk c's dispatch wait after chunk
c-1's expert work makes the backward issue chunk c's reverse exchange before chunk c-1's expert backward. The price:
each chunk's grouped GEMMs get 1/C of the rows.
Host syncs: one per layer, the `.tolist()` of the exchanged counts (all chunks in one exchange) that
all_to_all_single needs as split sizes. The backward pass reuses them, and so does a checkpoint's recomputation of
the layer (framework/models/recompute.py): no second count exchange, no second sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from framework.models.recompute import replay
from framework.moe.dispatch import Experts
from framework.moe.router import Routing
from framework.ops.expert_sort import group_ends, tokens_per_expert
from framework.ops.permute import expand_rows, gather_sum
from framework.parallel.all_to_all import Exchange, all_to_all_start, all_to_all_wait


class _Sent(NamedTuple):
    """One chunk's side of the exchange: what it sent and how to sum what comes back."""

    pair_index_TR: torch.Tensor  # [T, ep] sent pair row of (token, rank); P where the token skips that rank
    send_splits: list[int]  # pair rows sent to each EP rank
    recv_splits: list[int]  # pair rows received from each EP rank
    rows: tuple[torch.Tensor, Exchange]  # the pair rows in flight
    slots: tuple[torch.Tensor, Exchange]  # their [weights | local expert ids] in flight


def _first_sorted(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the `count` smallest keys in stable sorted order, and for every position its rank in that order
    (`count` for the rest): a partial permutation and its inverse."""
    order = torch.argsort(keys, stable=True)[:count]
    inverse = torch.full_like(keys, count, dtype=torch.int64)
    inverse[order] = torch.arange(count, device=keys.device)
    return order, inverse


def _spans(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous token ranges of near-equal size (fewer when there are fewer tokens)."""
    chunks = max(1, min(chunks, tokens))
    bounds = [tokens * c // chunks for c in range(chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class AllToAllDispatcher:
    def __init__(self, ep_group, ep_size: int, num_experts: int, chunks: int = 1):
        if chunks < 1:
            raise ValueError(f"chunks ({chunks}) must be >= 1")
        self.group = ep_group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size
        self.chunks = chunks

    def route(self, routing: Routing, num_experts: int, experts: Experts) -> torch.Tensor:
        ep, e = self.ep_size, self.num_local
        x_TH, ids_TK = routing.tokens, routing.expert_ids
        spans = _spans(ids_TK.shape[0], self.chunks)
        hit_TR = torch.zeros(ids_TK.shape[0], ep, dtype=torch.bool, device=x_TH.device)
        hit_TR.scatter_(1, torch.div(ids_TK, e, rounding_mode="floor"), True)

        # counts[r, c, :e]: chunk c's rows for rank r's experts; counts[r, c, e]: chunk c's pairs for rank r. All
        # chunks in one exchange, one host sync; none when a checkpoint recomputes this layer (the first run's).
        send_counts = torch.stack([torch.cat([tokens_per_expert(ids_TK[a:b], num_experts).view(ep, e),
                                              hit_TR[a:b].sum(0, dtype=torch.int64).unsqueeze(1)], dim=1)
                                   for a, b in spans], dim=1)
        region = replay()
        kept = region.take() if region is not None else None
        if kept is not None:
            sent_before, recv_counts, host = kept
            # the recomputation routes as the first run did (checkpointing already relies on it); if it ever did
            # not, the splits below would not fit the rows: stop on the device rather than exchange wrong rows
            torch._assert_async((send_counts == sent_before).all(),
                                "the recomputation of an MoE layer routed differently from its first run")
        else:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            host = torch.cat([send_counts[:, :, e].t().reshape(-1), recv_counts[:, :, e].t().reshape(-1),
                              recv_counts[:, :, :e].sum((0, 2))]).tolist()  # the one sync
            if region is not None:
                region.record((send_counts, recv_counts, host))
        chunks = len(spans)
        pairs_sent = [host[c * ep:(c + 1) * ep] for c in range(chunks)]
        pairs_recv = [host[(chunks + c) * ep:(chunks + c + 1) * ep] for c in range(chunks)]
        rows_here = host[2 * chunks * ep:]
        experts_ends = group_ends(recv_counts[:, :, :e].sum(0))  # [C, e] row ends per local expert, on the device

        sent = [self._send(x_TH[a:b], ids_TK[a:b], routing.weights[a:b], hit_TR[a:b], send, recv)
                for (a, b), send, recv in zip(spans, pairs_sent, pairs_recv)]
        back = []
        for c, chunk in enumerate(sent):
            pair_out = self._compute(chunk, rows_here[c], experts_ends[c], experts, ids_TK.shape[1])
            back.append(all_to_all_start(pair_out, chunk.send_splits, chunk.recv_splits, self.group))
        outs = [gather_sum(all_to_all_wait(*b), chunk.pair_index_TR)
                for chunk, b in zip(sent, back)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _send(self, x_TH, ids_TK, weights_TK, hit_TR, send_splits, recv_splits) -> _Sent:
        ep, e = self.ep_size, self.num_local
        tokens = ids_TK.shape[0]
        # Pairs in rank-major, then token order: pair id r*T + t.
        pairs_P, pair_inverse = _first_sorted((~hit_TR.t().reshape(-1)).to(torch.uint8), sum(send_splits))
        pair_token_P = pairs_P % tokens
        pair_index_TR = pair_inverse.view(ep, tokens).t().contiguous()
        pair_rank_P = torch.div(pairs_P, tokens, rounding_mode="floor")
        ids_PK = ids_TK.index_select(0, pair_token_P)
        here_PK = torch.div(ids_PK, e, rounding_mode="floor") == pair_rank_P.unsqueeze(1)
        local_ids_PK = torch.where(here_PK, ids_PK % e, -1)
        weights_PK = expand_rows(weights_TK, pair_token_P, pair_index_TR) * here_PK
        rows = all_to_all_start(expand_rows(x_TH, pair_token_P, pair_index_TR), recv_splits, send_splits, self.group)
        # ids are small integers, exact in fp32: one exchange carries them with the (differentiable) weights.
        slots = all_to_all_start(torch.cat([weights_PK.float(), local_ids_PK.float()], dim=1), recv_splits,
                                 send_splits, self.group)
        return _Sent(pair_index_TR, send_splits, recv_splits, rows, slots)

    def _compute(self, chunk: _Sent, rows_here: int, ends_e: torch.Tensor, experts: Experts,
                 top_k: int) -> torch.Tensor:
        """The received pairs of one chunk through the local experts: [Pr, H] routing-weighted sums per pair."""
        rows_recv = all_to_all_wait(*chunk.rows)
        slots_recv = all_to_all_wait(*chunk.slots)
        weights_recv, local_ids_recv = slots_recv[:, :top_k], slots_recv[:, top_k:].long()
        # Expand received pairs into one row per local expert, expert-major; other ranks' slots sort last, unused.
        keys = torch.where(local_ids_recv >= 0, local_ids_recv, self.num_local).reshape(-1)
        slots_Q, expert_index = _first_sorted(keys, rows_here)
        expert_index_PK = expert_index.view(rows_recv.shape[0], top_k)
        rows_QH = expand_rows(rows_recv, torch.div(slots_Q, top_k, rounding_mode="floor"), expert_index_PK)
        weights_Q = weights_recv.to(rows_QH.dtype).reshape(-1).index_select(0, slots_Q)
        return gather_sum(experts(rows_QH, ends_e, weights_Q), expert_index_PK)
