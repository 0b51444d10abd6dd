#!/usr/bin/env python
"""Where the MoE layer's host time goes, stage by stage, without a profiler.

    python benchmarks/layer_host.py [--tokens 4096 16384] [--iters 30] [--mode synced ahead busy]

One Qwen3-30B-A3B layer (ours, grouped_mm, local dispatch), forward+backward as benchmarks/moe_layer.py times it,
cut into the stages its forward runs (router, dispatch, experts, combine, balance statistics) and the
backward; medians over --iters steps. The step has no host sync, so the host never waits inside it and each stage's
time is the host's alone. Three ways to run the steps (--mode): `synced`, each step after a sync (the condition of
moe_layer.py's timed steps); `ahead`, back to back with no sync (as in training, where the GPU is still busy with
earlier work; at token counts where the device is much slower than the host the launch queue can fill and block);
`busy`, each step after a sync and ~100 ms of queued device work (how moe_layer.py's `--overheads` measures its
host enqueue). On an H200 (session 13) `busy` gave a larger host total (3.76 ms per step at T=4,096) than the
per-step wall time with the host running ahead (2.58 ms), so it overstates the host. Beside them, what one call
of each kind costs on this host in a tight loop: a small torch op, an empty autograd Function, a one-element Triton
kernel, the router's linear under cuBLAS and cuBLASLt (the real step's calls cost more than these: its Python is
not in a hot loop). Why: in the synced step the device idles until the host has enqueued everything up to the first
grouped GEMM (PERF_NOTES, "Where the synced step waits"), and the torch
profiler inflates exactly those host times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.moe.aux_loss import router_stats  # noqa: E402
from framework.moe.dispatch import TorchDispatcher  # noqa: E402
from framework.moe.layer import MoEBlock  # noqa: E402
from framework.moe.router import Routing, TopKRouter  # noqa: E402
from framework.ops.expert_sort import expand_by_expert  # noqa: E402
from framework.ops.permute import gather_sum  # noqa: E402
from framework.ops.softmax_topk import linear_softmax_topk  # noqa: E402

H, I, E, K = 2048, 768, 128, 8
STAGES = ("grads", "router", "dispatch", "experts", "combine", "stats", "backward")
BEFORE_FIRST_GEMM = ("grads", "router", "dispatch")


def staged_step(block: MoEBlock, x_BSH: torch.Tensor, dy_BSH: torch.Tensor, mark: Callable[[str], None]
                ) -> torch.Tensor:
    """One forward+backward of `block` (TopKRouter, local TorchDispatcher, no shared experts) as MoEBlock.forward
    runs it, with `mark(stage)` called as each stage ends; returns the forward output (tests compare it with
    `block(x)`)."""
    x_BSH.grad = None
    for p in block.parameters():
        p.grad = None
    mark("grads")
    x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
    router = block.gate  # TopKRouter.forward (its Module call is not timed)
    routing = Routing(*linear_softmax_topk(x_TH, router.weight, router.top_k, router.norm_topk_prob))
    mark("router")
    rows, weights_R, inverse_TK, ends = expand_by_expert(routing.tokens, routing.expert_ids, routing.weights,
                                                         block.num_experts)
    mark("dispatch")
    out = block.experts(rows, ends, weights_R)
    mark("experts")
    y_TH = gather_sum(out, inverse_TK)
    mark("combine")
    router_stats(routing, None, block.z_loss)
    mark("stats")
    y_BSH = y_TH.view_as(x_BSH)
    y_BSH.backward(dy_BSH)
    mark("backward")
    return y_BSH


def stage_times_us(block: MoEBlock, x: torch.Tensor, dy: torch.Tensor, iters: int, mode: str) -> dict[str, float]:
    """Median host microseconds per stage over `iters` steps (after 3 warm-up steps); `mode` as in the module doc."""
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    torch.cuda.synchronize()
    for i in range(iters + 3):
        if mode in ("synced", "busy"):
            torch.cuda.synchronize()
        if mode == "busy":
            torch.cuda._sleep(int(2e8))  # ~100 ms queued first
        stamps = [("start", time.perf_counter())]
        staged_step(block, x, dy, lambda stage: stamps.append((stage, time.perf_counter())))
        if i >= 3:  # warm-up
            for (_, t0), (stage, t1) in zip(stamps, stamps[1:]):
                times[stage].append((t1 - t0) * 1e6)
    torch.cuda.synchronize()
    return {s: statistics.median(v) for s, v in times.items()}


def launch_costs_us(tokens: int, iters: int = 200) -> dict[str, float]:
    """Host microseconds of one call of each kind in a tight loop (medians of `iters`), the router's linear at
    `tokens` tokens among them, under each of torch's BLAS back ends (cuBLAS looks its kernel up per call)."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def _copy_one(src_ptr, dst_ptr):
        tl.store(dst_ptr, tl.load(src_ptr))

    class _Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    small = torch.zeros(1, device="cuda")
    dst = torch.zeros(1, device="cuda")
    leaf = torch.zeros(1, device="cuda", requires_grad=True)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(E, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    identity = torch.nn.Identity()
    kinds = {"torch op (add_ of 1 element)": lambda: small.add_(1),
             "torch.empty (1 element)": lambda: torch.empty(1, device="cuda"),
             "nn.Module call (Identity)": lambda: identity(small),
             "autograd Function, empty": lambda: _Identity.apply(leaf),
             "Triton kernel, 1 element": lambda: _copy_one[(1,)](small, dst)}
    out = {name: _median_call_us(fn, iters) for name, fn in kinds.items()}
    blas = torch.backends.cuda.preferred_blas_library()
    try:
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            out[f"router linear [{tokens}, {H}] x [{H}, {E}], {lib}"] = _median_call_us(lambda: F.linear(x, w), iters)
    finally:
        torch.backends.cuda.preferred_blas_library(blas)
    return out


def _median_call_us(fn: Callable[[], object], iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--mode", nargs="+", choices=["synced", "ahead", "busy"],
                        default=["synced", "ahead"])
    args = parser.parse_args()
    block = MoEBlock(H, I, E, TopKRouter(H, E, K, True), torch.nn.SiLU(), backend="grouped_mm").cuda().bfloat16()
    assert isinstance(block.dispatcher, TorchDispatcher)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    print(f"{torch.cuda.get_device_name()}; one Qwen3-30B-A3B layer (H={H} I={I} E={E} K={K}), grouped_mm; "
          f"host microseconds, medians of {args.iters} steps")
    for name, us in launch_costs_us(args.tokens[0]).items():
        print(f"  one call: {name:<48} {us:7.1f}")
    for tokens in args.tokens:
        x = torch.randn(1, tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        for mode in args.mode:
            us = stage_times_us(block, x, dy, args.iters, mode)
            total = sum(us.values())
            before = sum(us[s] for s in BEFORE_FIRST_GEMM)
            print(f"\nT={tokens}, {mode}: {total:.0f} us in all; {before:.0f} us before the first grouped GEMM's "
                  f"launch ({' + '.join(BEFORE_FIRST_GEMM)})")
            for stage in STAGES:
                print(f"  {stage:<10} {us[stage]:8.1f}  {100 * us[stage] / total:4.0f}%")

if __name__ == "__main__":
    main()
