"""Causal attention of Qwen3-30B-A3B (32 query heads, 4 KV heads, head dim 128), bf16, forward+backward, one GPU.

    python benchmarks/attention.py [--batch 4] [--seq 4096] [--iters 20] [--packed MEAN_DOC_LEN]

Whole rows (default): our "varlen" implementation's kernel for packed documents (framework/models/qwen3_moe/
attention.py: torch's flash varlen, here given one document per row), cuDNN's ragged kernel (not used by the model,
see below) and torch's scaled_dot_product_attention pinned to each backend it has (flash, cuDNN, memory-efficient),
with enable_gqa where the backend takes it. --packed L: rows packed with documents of random lengths (mean L tokens,
the last one cut at the row end); every timed call takes the next of 16 such layouts, so a kernel that rebuilds per
document count pays for it; rows: both variable-length kernels, and dense causal cuDNN over the same tokens (no
document mask: what the work would cost as whole rows). FLOPs (causal) = 4 * sum(L^2) * heads * D / 2 forward, x 2.5
backward; the dense bf16 matmul ceiling is measured in the same run. A kernel that refuses the shape prints its error
instead of a time. The last columns compare outputs and gradients with the first row.
cuDNN ragged = aten::_cudnn_attention_forward with cumulative lengths, which torch wires into torch.nn.attention.varlen
but keeps switched off: on torch 2.11 + cuDNN 9.19 (H200) its forward matches flash varlen, its gradients do not
(relative differences above 1, NaN) and it takes 100-145 ms where flash takes 3-8 ms (benchmarks/PERF_NOTES.md, 10).
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.moe_layer import matmul_ceiling_tflops, time_ms
from framework.models.attention import _varlen_attention_forward, varlen_attention_available

HEADS, KV_HEADS, D = 32, 4, 128


def cudnn_ragged_causal(q, k, v, cu_seqlens, max_len: int, scale: float):
    """q [T, Hq, D], k/v [T, Hkv, D], causal inside each document; autograd differentiates the op."""
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_seqlens, cu_seqlens, max_len, max_len, True, 0.0,
                                                   True, False, scale=scale)[0]


def packed_layouts(batch: int, seq: int, mean: int, count: int = 16) -> list[tuple[torch.Tensor, float]]:
    """`count` document layouts of `batch` rows: (int32 cumulative lengths on the GPU, sum of squared lengths)."""
    rng = random.Random(0)
    layouts = []
    for _ in range(count):
        lengths = []
        for _ in range(batch):
            left = seq
            while left:
                n = min(left, max(1, int(rng.expovariate(1 / mean))))
                lengths.append(n)
                left -= n
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device="cuda")
        layouts.append((cu, float(sum(n * n for n in lengths))))
    return layouts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--packed", type=int, default=0, metavar="MEAN_DOC_LEN",
                    help="rows packed with documents of this mean length (0: one document per row)")
    args = ap.parse_args()
    b, s = args.batch, args.seq
    torch.manual_seed(0)
    q = torch.randn(b, HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, KV_HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, KV_HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(b, s, HEADS, D, device="cuda", dtype=torch.bfloat16)
    whole_rows = [(torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda"), float(b * s * s))]
    layouts = packed_layouts(b, s, args.packed) if args.packed else whole_rows
    flops = 3.5 * 4 * (sum(sq for _, sq in layouts) / len(layouts)) * HEADS * D / 2
    dense_flops = 3.5 * 4 * b * s * s * HEADS * D / 2
    ceiling = matmul_ceiling_tflops(args.iters)
    turn = [0]  # the next layout each varlen call takes

    def next_layout() -> torch.Tensor:
        turn[0] += 1
        return layouts[(turn[0] - 1) % len(layouts)][0]

    def varlen():
        out, _ = _varlen_attention_forward(None, q, k, v, None, scaling=D**-0.5, cu_seqlens=next_layout())
        out.backward(dy)
        return out

    def cudnn_ragged():
        flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], D) for t in (q, k, v)]
        out = cudnn_ragged_causal(*flat, next_layout(), s, D**-0.5).view(b, s, HEADS, D)
        out.backward(dy)
        return out

    def sdpa(backend, gqa):
        def step():
            kk, vv = (k, v) if gqa else (k.repeat_interleave(HEADS // KV_HEADS, 1),
                                         v.repeat_interleave(HEADS // KV_HEADS, 1))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=D**-0.5, enable_gqa=gqa)
            out = out.transpose(1, 2)
            out.backward(dy)
            return out
        return step

    def grads(fn):
        q.grad = k.grad = v.grad = None
        turn[0] = 0  # every row's gradients on layout 0
        out = fn().detach()
        return [out, q.grad.clone(), k.grad.clone(), v.grad.clone()]

    rows = [("varlen (ours, flash)", varlen, flops)] if varlen_attention_available() else []
    rows += [("cudnn ragged (not used)", cudnn_ragged, flops)]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for name, backend in backends[1:2] if args.packed else backends:
        rows += [(f"sdpa {name} gqa" + (" (no doc mask)" if args.packed else ""), sdpa(backend, True), dense_flops)]
        if not args.packed:
            rows += [(f"sdpa {name} repeat_kv", sdpa(backend, False), dense_flops)]
    print(f"{torch.cuda.get_device_name()}  B={b} S={s} heads={HEADS}/{KV_HEADS} D={D}  "
          + (f"packed: mean document {args.packed}, {len(layouts)} layouts, "
             f"{sum(c.numel() - 1 for c, _ in layouts) / len(layouts):.1f} documents per call  " if args.packed else "")
          + f"dense bf16 ceiling {ceiling:.0f} TFLOP/s")
    print(f"{'row':30s} {'ms':>8s} {'TFLOP/s':>8s} {'% ceil':>7s} {'speedup':>8s}  max rel. diff of out, dq, dk, dv")
    ref = first = None
    for name, fn, row_flops in rows:
        try:
            ms = time_ms(fn, args.iters)
            got = grads(fn)
        except RuntimeError as err:
            print(f"{name:30s} unavailable: {str(err).splitlines()[0][:90]}")
            continue
        ref, first = ref or ms, first or got
        diff = " ".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}" for a, b in zip(got, first))
        tf = row_flops / ms / 1e9
        print(f"{name:30s} {ms:8.3f} {tf:8.1f} {100 * tf / ceiling:6.1f}% {ref / ms:7.2f}x  {diff}")


if __name__ == "__main__":
    main()
