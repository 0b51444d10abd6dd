"""Triton kernels for the memory-bound steps of the MoE layer, the loss and the optimizer (CUDA only; importing needs
Triton).

Legend: T tokens, K top-k (or slots per token), R rows, H hidden, I expert FFN.
Each kernel does in one pass what eager torch does in three or four (a gather, a temporary [R, H] or [R, I], a
multiply, a reduction): these steps move bytes, not FLOPs, so one read and one write is the whole cost. All
arithmetic is in fp32; loads and stores are in the tensors' dtype. Callers (swiglu.py, permute.py, adamw.py) own
autograd and the torch fallbacks used on CPU.
Loss legend: C tokens of a chunk, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(gate_up_ptr, weight_ptr, out_ptr, n_elements, inter: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // inter
    col = offs % inter
    g = tl.load(gate_up_ptr + row * (2 * inter) + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + row * (2 * inter) + inter + col, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    if HAS_WEIGHT:
        h = h * tl.load(weight_ptr + row, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(gate_up_ptr, weight_ptr, grad_ptr, grad_gate_up_ptr, grad_weight_ptr, n_rows, inter,
                HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr):
    # A program owns ROWS whole rows: a row weight's gradient is a dot over all I columns of its row.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        dot = tl.zeros([ROWS], dtype=tl.float32)
    for start in tl.range(0, inter, BLOCK_I):
        cols = start + tl.arange(0, BLOCK_I)
        mask = row_mask[:, None] & (cols[None, :] < inter)
        g_off = rows[:, None] * (2 * inter) + cols[None, :]
        g = tl.load(gate_up_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_up_ptr + g_off + inter, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(grad_ptr + rows[:, None] * inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        if HAS_WEIGHT:
            dot += tl.sum(dh * silu * u, axis=1)
            dh = dh * w[:, None]
        dg = dh * u * s * (1.0 + g * (1.0 - s))
        du = dh * silu
        tl.store(grad_gate_up_ptr + g_off, dg.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_gate_up_ptr + g_off + inter, du.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(grad_weight_ptr + rows, dot.to(grad_weight_ptr.dtype.element_ty), mask=row_mask)


def _swiglu_tiles(inter: int) -> tuple[int, int]:
    """(rows per program, column tile) of the backward: ~2,048 elements a tile, columns first (coalesced)."""
    block_i = min(triton.next_power_of_2(inter), 256)
    return max(2048 // block_i, 1), block_i


def swiglu_forward(gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None) -> torch.Tensor:
    rows, two_inter = gate_up_R2I.shape
    out = gate_up_R2I.new_empty(rows, two_inter // 2)
    n = out.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](gate_up_R2I, gate_up_R2I if weight_R is None else weight_R, out, n,
                                               two_inter // 2, weight_R is not None, BLOCK=_BLOCK)
    return out


def swiglu_backward(gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None, grad_RI: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gradient of gate_up, gradient of the row weights or None without them)."""
    rows, two_inter = gate_up_R2I.shape
    grad_gate_up = torch.empty_like(gate_up_R2I)
    grad_weight = None if weight_R is None else torch.empty_like(weight_R)
    if grad_RI.numel():
        per_program, block_i = _swiglu_tiles(two_inter // 2)
        _swiglu_bwd[(triton.cdiv(rows, per_program),)](
            gate_up_R2I, gate_up_R2I if weight_R is None else weight_R, grad_RI, grad_gate_up,
            grad_gate_up if grad_weight is None else grad_weight, rows, two_inter // 2, weight_R is not None,
            ROWS=per_program, BLOCK_I=block_i)
    return grad_gate_up, grad_weight


@triton.jit
def _gather_sum(rows_ptr, index_ptr, out_ptr, n_rows, hidden: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # index >= n_rows marks a hole (no row): it adds nothing.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        src = tl.load(index_ptr + token * K + k).to(tl.int64)
        acc += tl.load(rows_ptr + src * hidden + cols, mask=mask & (src < n_rows), other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spread_rows(x_ptr, index_ptr, rows_ptr, n_rows, hidden: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr):
    # Each of a token's K slots gets a copy of its row; holes (index >= n_rows) get nothing.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + token * hidden + cols, mask=mask)
    for k in tl.static_range(K):
        dst = tl.load(index_ptr + token * K + k).to(tl.int64)
        tl.store(rows_ptr + dst * hidden + cols, x, mask=mask & (dst < n_rows))


def _block_h(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), 2048)


def gather_sum(rows_RH: torch.Tensor, index_TK: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_k rows[index[t, k]], holes skipped, summed in fp32."""
    tokens, k = index_TK.shape
    hidden = rows_RH.shape[1]
    out = rows_RH.new_empty(tokens, hidden)
    if tokens:
        block = _block_h(hidden)
        _gather_sum[(tokens, triton.cdiv(hidden, block))](rows_RH, index_TK, out, rows_RH.shape[0], hidden, k,
                                                          BLOCK_H=block)
    return out


def spread_rows(x_TH: torch.Tensor, index_TK: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows, H]: rows[index[t, k]] = x[t] for every slot (t, k) but holes; every row is named by exactly one
    slot, so each is written once."""
    tokens, k = index_TK.shape
    hidden = x_TH.shape[1]
    rows = x_TH.new_empty(n_rows, hidden)
    if tokens:
        block = _block_h(hidden)
        _spread_rows[(tokens, triton.cdiv(hidden, block))](x_TH, index_TK, rows, n_rows, hidden, k, BLOCK_H=block)
    return rows


@triton.jit
def _cross_entropy_grad(logits_ptr, labels_ptr, loss_ptr, vocab, ignore_index, BLOCK_V: tl.constexpr):
    # One program per token row: pass 1 keeps a running max and sum of exp per lane (online log-sum-exp, fp32),
    # pass 2 overwrites the row with softmax - one-hot. Lanes start at a finite floor so that a lane that never sees
    # a real logit contributes exp(floor - max) = 0, never NaN.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * vocab
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)
    lane_max = tl.full([BLOCK_V], -1e30, dtype=tl.float32)
    lane_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in tl.range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=-1e30).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.where(mask, tl.exp(x - new_max), 0.0)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    x_target = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    scale = tl.where(valid, 1.0, 0.0)
    for start in tl.range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_(logits_CV: torch.Tensor, labels_C: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token cross-entropy [C] in fp32 (0 where the label is ignore_index); logits_CV (contiguous) is
    overwritten with the gradient of the summed loss w.r.t. the logits, softmax - one-hot (0 on ignored rows)."""
    rows, vocab = logits_CV.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits_CV.device)
    if rows:
        _cross_entropy_grad[(rows,)](logits_CV, labels_C, loss, vocab, ignore_index, BLOCK_V=4096, num_warps=16)
    return loss


# The dispatch's stable counting sort of routed slots by expert, fused with the row copy it feeds. Pass 1: each block
# of slots counts its experts into an [E, blocks] table. Pass 2: each program reads the whole table (in tiles, from
# L2) and forms its block's first position per expert itself (the rows of all lower experts plus this expert's rows
# in lower blocks), ranks each slot among its chunk's slots of the same expert (a triangular [CHUNK, CHUNK] compare),
# writes the slot's sorted position and copies its token's row there. Equal to torch.argsort(ids, stable=True), its
# inverse, the row ends and x[order // K]: two launches where the sort, its cumsum and an index_select with its int64
# source index took four (PERF_NOTES change 26). Slots are token-major, so a chunk's K copies of a token's row read
# x once from memory; index_select, in sorted order, read a row from memory for every copy.
_ONE_HOT_VALUES = 8192  # [CHUNK, E_PAD] one-hot tile: 32 values per thread at 8 warps
_MAX_CHUNK = 64  # and the [CHUNK, CHUNK] rank compare
_TABLE_READS = 1 << 23  # blocks x (E_PAD x blocks) counts read by pass 2 in all: ~32 MB of L2 reads at most
_TABLE_TILE = 8192  # [E_PAD, blocks] tile of the table read at a time
_COPY_COLS = 512
_COPY_PROGRAMS_PER_SM = 4


@triton.jit
def _expert_block_counts(ids_ptr, counts_ptr, n, n_blocks, chunks_per_block, E: tl.constexpr, E_PAD: tl.constexpr,
                         CHUNK: tl.constexpr):
    block = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for c in tl.range(0, chunks_per_block):
        offs = (block * chunks_per_block + c).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=E_PAD)  # E_PAD matches no expert column
        total += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + experts * n_blocks + block, total, mask=experts < E)


@triton.jit
def _expert_expand(ids_ptr, counts_ptr, x_ptr, weights_ptr, rows_ptr, row_weights_ptr, inverse_ptr, ends_ptr, n,
                   n_blocks, chunks_per_block,
                   cols_per_program, hidden, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                   TILE_B: tl.constexpr, CHUNK: tl.constexpr, COLS: tl.constexpr):
    block = tl.program_id(0)
    col_program = tl.program_id(1)
    experts = tl.arange(0, E_PAD)
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)  # this expert's slots in lower blocks
    for b0 in tl.range(0, n_blocks, TILE_B):
        blocks = b0 + tl.arange(0, TILE_B)
        tile = tl.load(counts_ptr + experts[:, None] * n_blocks + blocks[None, :],
                       mask=(experts[:, None] < E) & (blocks[None, :] < n_blocks), other=0)
        totals += tl.sum(tile, axis=1)
        before += tl.sum(tl.where(blocks[None, :] < block, tile, 0), axis=1)
    ends = tl.cumsum(totals, axis=0)
    running = ends - totals + before
    if block == 0:
        if col_program == 0:
            tl.store(ends_ptr + experts, ends, mask=experts < E)
    col_start = col_program * cols_per_program
    lanes = tl.arange(0, CHUNK)
    earlier = lanes[None, :] < lanes[:, None]  # [i, j]: slot j comes before slot i in the chunk
    for c in tl.range(0, chunks_per_block):
        offs = (block * chunks_per_block + c).to(tl.int64) * CHUNK + lanes
        mask = offs < n
        ids = tl.load(ids_ptr + offs, mask=mask, other=E_PAD)
        hit = ids[:, None] == experts[None, :]
        rank = tl.sum(((ids[:, None] == ids[None, :]) & earlier).to(tl.int32), axis=1)
        pos = (tl.sum(tl.where(hit, running[None, :], 0), axis=1) + rank).to(tl.int64)
        running += tl.sum(hit.to(tl.int32), axis=0)
        if col_program == 0:
            tl.store(inverse_ptr + offs, pos, mask=mask)
            tl.store(row_weights_ptr + pos, tl.load(weights_ptr + offs, mask=mask), mask=mask)
        token = offs // K
        for col in tl.range(0, cols_per_program, COLS):
            cols = col_start + col + tl.arange(0, COLS)
            copy_mask = mask[:, None] & (cols[None, :] < hidden)
            row = tl.load(x_ptr + token[:, None] * hidden + cols[None, :], mask=copy_mask)
            tl.store(rows_ptr + pos[:, None] * hidden + cols[None, :], row, mask=copy_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class ExpandGeometry(NamedTuple):
    """How `expand_by_expert` tiles its work (benchmarks/dispatch_copy.py sweeps it)."""

    e_pad: int  # experts padded to a power of 2 (>= 16)
    chunk: int  # slots ranked at a time
    chunks_per_block: int
    blocks: int
    col_programs: int  # programs sharing one block's copy, each over its own columns
    cols_per_program: int
    cols: int  # copy tile width
    num_warps: int


def expand_geometry(n: int, num_experts: int, hidden: int, sms: int, *, table_reads: int = _TABLE_READS,
                    cols: int = _COPY_COLS, programs_per_sm: int = _COPY_PROGRAMS_PER_SM, max_split_chunks: int = 2,
                    num_warps: int = 8) -> ExpandGeometry:
    """The tiling for n slots of width `hidden` on `sms` SMs. The blocks are as many as the count table allows
    (pass 2 reads blocks x E x blocks counts in all); the copy splits over columns only where the blocks are too
    few to keep `programs_per_sm` programs per SM busy and each block has at most `max_split_chunks` chunks,
    because every column program ranks its block's slots again."""
    e_pad = max(triton.next_power_of_2(num_experts), 16)
    chunk = max(min(_ONE_HOT_VALUES // e_pad, _MAX_CHUNK), 16)
    chunks = max(triton.cdiv(n, chunk), 1)
    per_block = triton.cdiv(chunks, max(math.isqrt(table_reads // e_pad), 1))
    n_blocks = triton.cdiv(chunks, per_block)
    col_tiles = max(triton.cdiv(hidden, cols), 1)
    wanted = triton.cdiv(programs_per_sm * sms, n_blocks) if per_block <= max_split_chunks else 1
    tiles_per_program = triton.cdiv(col_tiles, min(wanted, col_tiles))
    return ExpandGeometry(e_pad, chunk, per_block, n_blocks, triton.cdiv(col_tiles, tiles_per_program),
                          tiles_per_program * cols, cols, num_warps)


def expand_by_expert(x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                     geometry: ExpandGeometry | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [T*K, H]: x's rows, one per slot, sorted stably by expert; row weights [T*K]: each slot's weight at
    its row; inverse [T, K] int64: each slot's row; ends [E] int32: cumulative row ends per expert) for contiguous
    x, int64 ids in [0, num_experts) and contiguous weights. No autograd. `geometry` defaults to
    `expand_geometry`'s for this device."""
    tokens, hidden = x_TH.shape
    top_k = ids_TK.shape[1]
    n = tokens * top_k
    device = x_TH.device
    if geometry is None:
        geometry = expand_geometry(n, num_experts, hidden, _sm_count(device) if x_TH.is_cuda else 8)
    g = geometry
    counts = torch.empty(num_experts, g.blocks, dtype=torch.int32, device=device)
    rows = x_TH.new_empty(n, hidden)
    row_weights = weights_TK.new_empty(n)
    inverse = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    _expert_block_counts[(g.blocks,)](ids_TK, counts, n, g.blocks, g.chunks_per_block, num_experts, g.e_pad,
                                      CHUNK=g.chunk, num_warps=g.num_warps)
    _expert_expand[(g.blocks, g.col_programs)](
        ids_TK, counts, x_TH, weights_TK, rows, row_weights, inverse, ends, n, g.blocks, g.chunks_per_block,
        g.cols_per_program, hidden, top_k, num_experts, g.e_pad, max(_TABLE_TILE // g.e_pad, 1), CHUNK=g.chunk,
        COLS=g.cols, num_warps=g.num_warps)
    return rows, row_weights, inverse, ends


# The top-k softmax router: its linear (x @ W^T, fp32 accumulation, the logits rounded to their dtype as torch's
# matmul rounds them), softmax in fp32, top-k by K rounds of a row argmax (ties to the lower expert id, as a stable
# descending sort), the chosen probabilities renormalised. One launch forward where eager torch runs a GEMM and six
# kernels: each launch before the first grouped GEMM is host time the device waits for at 4,096 tokens (folding the
# GEMM in saved 25-80 us of it, PERF_NOTES 23, 27). One launch backward for the logits' gradient, then the linear's
# two GEMMs.
@triton.jit
def _linear_softmax_topk_fwd(x_ptr, w_ptr, logits_ptr, probs_ptr, ids_ptr, weights_ptr, n_rows, hidden,
                             E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                             NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_mask = rows < n_rows
    col_mask = cols < E
    mask = row_mask[:, None] & col_mask[None, :]
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for h0 in tl.range(0, hidden, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < hidden
        a = tl.load(x_ptr + rows[:, None] * hidden + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * hidden + hs[:, None], mask=col_mask[None, :] & h_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    logits = acc.to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + rows[:, None] * E + cols[None, :], logits, mask=mask)
    x = tl.where(mask, logits.to(tl.float32), float("-inf"))
    x = tl.where(row_mask[:, None], x, 0.0)  # rows past the end: finite, never stored
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
    ks = tl.arange(0, K_PAD)
    remaining = tl.where(mask, p, -1.0)  # probabilities are >= 0: -1 marks taken and padded experts
    top = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.argmax(remaining, axis=1, tie_break_left=True)
        top = tl.where(ks[None, :] == k, tl.max(remaining, axis=1)[:, None], top)
        ids = tl.where(ks[None, :] == k, best[:, None], ids)
        remaining = tl.where(cols[None, :] == best[:, None], -1.0, remaining)
    if NORMALIZE:
        top = top / tl.sum(top, axis=1)[:, None]  # padded k columns hold 0
    k_mask = row_mask[:, None] & (ks[None, :] < K)
    tl.store(ids_ptr + rows[:, None] * K + ks[None, :], ids.to(tl.int64), mask=k_mask)
    tl.store(weights_ptr + rows[:, None] * K + ks[None, :], top.to(weights_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _softmax_topk_bwd(probs_ptr, ids_ptr, grad_weights_ptr, grad_probs_ptr, grad_probs_row_stride, grad_in_ptr,
                      grad_in_row_stride, grad_logits_ptr, n_rows, E: tl.constexpr, E_PAD: tl.constexpr,
                      K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
                      HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_IN: tl.constexpr, BLOCK_T: tl.constexpr):
    # grad_in: the logits' own gradient (the z-loss's), added to what flows back through the softmax
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < E)
    p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    if HAS_GRAD_PROBS:
        g = tl.load(grad_probs_ptr + rows[:, None] * grad_probs_row_stride + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    if HAS_GRAD_WEIGHTS:
        ks = tl.arange(0, K_PAD)
        k_mask = row_mask[:, None] & (ks[None, :] < K)
        ids = tl.load(ids_ptr + rows[:, None] * K + ks[None, :], mask=k_mask, other=0)
        gw = tl.load(grad_weights_ptr + rows[:, None] * K + ks[None, :], mask=k_mask, other=0.0).to(tl.float32)
        if NORMALIZE:  # w = top / s: d top_j = (gw_j - sum_k gw_k w_k) / s
            top = tl.load(probs_ptr + rows[:, None] * E + ids, mask=k_mask, other=0.0)
            s = tl.where(row_mask, tl.sum(top, axis=1), 1.0)
            gw = (gw - (tl.sum(gw * top, axis=1) / s)[:, None]) / s[:, None]
        for k in tl.static_range(K):  # scatter each chosen column's gradient into its expert
            id_k = tl.sum(tl.where(ks[None, :] == k, ids, 0), axis=1)
            g_k = tl.sum(tl.where(ks[None, :] == k, gw, 0.0), axis=1)
            g = tl.where(cols[None, :] == id_k[:, None], g + g_k[:, None], g)
    grad = p * (g - tl.sum(p * g, axis=1)[:, None])  # the softmax backward
    if HAS_GRAD_IN:
        grad += tl.load(grad_in_ptr + rows[:, None] * grad_in_row_stride + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
    tl.store(grad_logits_ptr + rows[:, None] * E + cols[None, :], grad.to(grad_logits_ptr.dtype.element_ty),
             mask=mask)


def _router_tiles(num_experts: int, top_k: int) -> tuple[int, int, int]:
    e_pad = triton.next_power_of_2(num_experts)
    return e_pad, max(triton.next_power_of_2(top_k), 2), max(min(2048 // e_pad, 128), 1)


def _router_rows_per_program(tokens: int, sms: int) -> int:
    # Each program reads all of W (E x H, 512 KB at Qwen3-30B-A3B) from L2: 64 rows keep those reads near x's own
    # bytes at large T; fewer rows where 64 would leave SMs idle.
    rows = 64
    while rows > 16 and triton.cdiv(tokens, rows) < sms:
        rows //= 2
    return rows


def linear_softmax_topk_forward(x_TH: torch.Tensor, weight_EH: torch.Tensor, top_k: int, normalize: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K] in x's dtype, ids [T, K] int64, probs [T, E] fp32, logits [T, E] in x's dtype) for
    contiguous x [T, H] and weight [E, H] of one dtype. fp32 inputs multiply in full fp32 (torch's default), not
    TF32."""
    tokens, hidden = x_TH.shape
    experts = weight_EH.shape[0]
    device = x_TH.device
    logits = torch.empty(tokens, experts, dtype=x_TH.dtype, device=device)
    probs = torch.empty(tokens, experts, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    weights = torch.empty(tokens, top_k, dtype=x_TH.dtype, device=device)
    if tokens:
        e_pad, k_pad, _ = _router_tiles(experts, top_k)
        block_t = _router_rows_per_program(tokens, _sm_count(device) if x_TH.is_cuda else 8)
        _linear_softmax_topk_fwd[(triton.cdiv(tokens, block_t),)](
            x_TH, weight_EH, logits, probs, ids, weights, tokens, hidden, experts, max(e_pad, 16), top_k, k_pad,
            normalize, "ieee" if x_TH.dtype == torch.float32 else "tf32", BLOCK_T=block_t, BLOCK_H=64,
            num_warps=8)  # 16: tl.dot's smallest tile
    return weights, ids, probs, logits


def softmax_topk_backward(probs_TE: torch.Tensor, ids_TK: torch.Tensor, grad_weights_TK: torch.Tensor | None,
                          grad_probs_TE: torch.Tensor | None, grad_logits_TE: torch.Tensor | None, normalize: bool,
                          dtype: torch.dtype) -> torch.Tensor:
    """The logits' gradient [T, E] in `dtype`: what flows back through the softmax and top-k plus the logits' own
    incoming gradient; any incoming gradient may be None (no gradient reached it). The probabilities' and logits'
    gradients may be broadcast rows (row stride 0: what a plain sum over tokens sends back)."""
    tokens, experts = probs_TE.shape
    top_k = ids_TK.shape[1]
    if grad_weights_TK is not None:
        grad_weights_TK = grad_weights_TK.contiguous()
    grad_probs_TE, probs_row_stride = _rows_of(grad_probs_TE)
    grad_logits_TE, logits_row_stride = _rows_of(grad_logits_TE)
    grad_logits = torch.empty(tokens, experts, dtype=dtype, device=probs_TE.device)
    e_pad, k_pad, block_t = _router_tiles(experts, top_k)
    if tokens:
        _softmax_topk_bwd[(triton.cdiv(tokens, block_t),)](
            probs_TE, ids_TK, grad_weights_TK, grad_probs_TE, probs_row_stride, grad_logits_TE, logits_row_stride,
            grad_logits, tokens, experts, e_pad, top_k, k_pad, normalize, grad_weights_TK is not None,
            grad_probs_TE is not None, grad_logits_TE is not None, BLOCK_T=block_t)
    return grad_logits


def _rows_of(grad_TE: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """An incoming [T, E] gradient with unit column stride and its row stride (0 for a broadcast row, and for None)."""
    if grad_TE is None:
        return None, 0
    if grad_TE.stride(1) != 1:
        grad_TE = grad_TE.contiguous()
    return grad_TE, grad_TE.stride(0)


@triton.jit
def _adamw_step(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, scale_ptr, n_elements, lr_wd, beta1,
                one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                HAS_SCALE: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    # torch's fused AdamW (ADAMW mode) element by element, in the same order. div_rn and sqrt_rn: Triton's fp32 `/`
    # and tl.sqrt are approximate (a few ulp), torch's kernels round correctly.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    p = tl.load(param_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    p = p - lr_wd * p
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(param_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                out: torch.Tensor | None, grad_scale: torch.Tensor | None, *, lr_wd: float, beta1: float, beta2: float,
                eps: float, step_size: float, bias_correction2_sqrt: float) -> None:
    """One AdamW step in place on contiguous fp32 param/exp_avg/exp_avg_sq from grad (any float dtype), writing
    param in out's dtype too when out is given; the scalars as framework/ops/adamw.py computes them."""
    n = param.numel()
    if n:
        # 1 - beta in double here: the kernel's fp32 1 - beta would round beta first.
        _adamw_step[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, out if out is not None else param,
            grad_scale if grad_scale is not None else param, n, lr_wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            step_size, bias_correction2_sqrt, HAS_SCALE=grad_scale is not None, HAS_OUT=out is not None,
            BLOCK=_BLOCK, num_warps=4)
