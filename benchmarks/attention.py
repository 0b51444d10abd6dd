"""Causal attention of Qwen3-30B-A3B (32 query heads, 4 KV heads, head dim 128), bf16, forward+backward, one GPU.

    python benchmarks/attention.py [--batch 4] [--seq 4096] [--iters 20]

Rows: our "varlen" implementation (framework/models/qwen3_moe/attention.py: torch's flash varlen kernel over packed
documents, here one document per row) and torch's scaled_dot_product_attention pinned to each backend it has (flash,
cuDNN, memory-efficient), with enable_gqa where the backend takes it. FLOPs (causal) = 4 * B * S^2 * heads * D / 2
forward, x 2.5 backward; the dense bf16 matmul ceiling is measured in the same run. A backend that refuses the shape
prints its error instead of a time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.moe_layer import matmul_ceiling_tflops, time_ms
from framework.models.qwen3_moe.attention import _varlen_attention_forward, varlen_attention_available

HEADS, KV_HEADS, D = 32, 4, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    b, s = args.batch, args.seq
    torch.manual_seed(0)
    q = torch.randn(b, HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, KV_HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, KV_HEADS, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(b, s, HEADS, D, device="cuda", dtype=torch.bfloat16)
    flops = 3.5 * 4 * b * s * s * HEADS * D / 2
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    ceiling = matmul_ceiling_tflops(args.iters)

    def varlen():
        out, _ = _varlen_attention_forward(None, q, k, v, None, scaling=D**-0.5, cu_seqlens=cu)
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
        out = fn().detach()
        return [out, q.grad.clone(), k.grad.clone(), v.grad.clone()]

    rows = [("varlen (ours)", varlen)] if varlen_attention_available() else []
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        rows += [(f"sdpa {name} gqa", sdpa(backend, True)), (f"sdpa {name} repeat_kv", sdpa(backend, False))]
    ref = None
    print(f"{torch.cuda.get_device_name()}  B={b} S={s} heads={HEADS}/{KV_HEADS} D={D}  "
          f"dense bf16 ceiling {ceiling:.0f} TFLOP/s")
    print(f"{'row':24s} {'ms':>8s} {'TFLOP/s':>8s} {'% ceil':>7s} {'speedup':>8s}  max rel. diff of out, dq, dk, dv")
    first = None
    for name, fn in rows:
        try:
            ms = time_ms(fn, args.iters)
            got = grads(fn)
        except RuntimeError as err:
            print(f"{name:24s} unavailable: {str(err).splitlines()[0][:90]}")
            continue
        ref, first = ref or ms, first or got
        diff = " ".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}" for a, b in zip(got, first))
        tf = flops / ms / 1e9
        print(f"{name:24s} {ms:8.3f} {tf:8.1f} {100 * tf / ceiling:6.1f}% {ref / ms:7.2f}x  {diff}")


if __name__ == "__main__":
    main()
