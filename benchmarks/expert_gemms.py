"""The MoE layer's six grouped GEMMs one by one, against the dense ceiling and the memory roofline (one GPU, bf16).

    python benchmarks/expert_gemms.py [--tokens 4096 16384 65536] [--iters 50]

One Qwen3-30B-A3B layer's expert GEMMs on T*k rows routed uniformly at random (each token picks k distinct experts):
the forward of gate_up and down, the input gradient ("dgrad") of each, and the weight gradient ("wgrad") of each in
two layouts: the transposed weight's ([E, H, 2I], then viewed back) and the parameter's own ([E, 2I, H]). Last, the
forward and autograd backward of each GEMM as the layer runs it, so a hidden copy (a gradient in the wrong layout)
would show as the gap to fwd + dgrad + wgrad. Measured in the same run: the dense bf16 matmul ceiling and the device
copy bandwidth. A GEMM's floor is max(FLOPs / ceiling, bytes / bandwidth); at 256 rows per expert each GEMM reads or
writes the E*3*H*I bf16 expert weights whatever T is, which puts it near the memory roofline. Times are medians of
CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.moe_layer import E, H, I, K, matmul_ceiling_tflops, time_ms


def copy_bandwidth_gbs(iters: int) -> float:
    """Device copy bandwidth (read + write bytes per second) of a 1 GiB clone."""
    src = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def routed_ids(tokens: int) -> torch.Tensor:
    """[T, K] int64: each token's K distinct experts, uniformly at random (seed 0)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    return torch.rand(tokens, E, device="cuda", generator=gen).topk(K, dim=-1).indices.contiguous()


def uniform_offsets(tokens: int) -> torch.Tensor:
    """Cumulative row ends per expert for `tokens` tokens, each routed to K distinct experts at random."""
    return torch.cumsum(torch.bincount(routed_ids(tokens).reshape(-1), minlength=E), 0).to(torch.int32)


def cases(tokens: int) -> list[tuple[str, Callable[[], object], float, int]]:
    """(name, the call, FLOPs, bytes read and written) for each GEMM at `tokens` tokens."""
    rows = tokens * K
    offs = uniform_offsets(tokens)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, gate_up_w = torch.randn(rows, H, **bf16), torch.randn(E, 2 * I, H, **bf16) * 0.02
    act, down_w = torch.randn(rows, I, **bf16), torch.randn(E, H, I, **bf16) * 0.02
    d_gate_up, d_out = torch.randn(rows, 2 * I, **bf16), torch.randn(rows, H, **bf16)
    gmm = torch._grouped_mm
    two = 2  # bytes per bf16 value
    out = [
        ("fwd gate_up", lambda: gmm(x, gate_up_w.transpose(-2, -1), offs=offs), rows * H * 2 * I,
         two * (rows * H + E * 2 * I * H + rows * 2 * I)),
        ("fwd down", lambda: gmm(act, down_w.transpose(-2, -1), offs=offs), rows * I * H,
         two * (rows * I + E * H * I + rows * H)),
        ("dgrad down", lambda: gmm(d_out, down_w, offs=offs), rows * H * I,
         two * (rows * H + E * H * I + rows * I)),
        ("dgrad gate_up", lambda: gmm(d_gate_up, gate_up_w, offs=offs), rows * 2 * I * H,
         two * (rows * 2 * I + E * 2 * I * H + rows * H)),
        ("wgrad down [E,I,H]^T", lambda: gmm(act.t(), d_out, offs=offs), rows * H * I,
         two * (rows * H + rows * I + E * H * I)),
        ("wgrad down [E,H,I]", lambda: gmm(d_out.t(), act, offs=offs), rows * H * I,
         two * (rows * H + rows * I + E * H * I)),
        ("wgrad gate_up [E,H,2I]^T", lambda: gmm(x.t(), d_gate_up, offs=offs), rows * H * 2 * I,
         two * (rows * H + rows * 2 * I + E * 2 * I * H)),
        ("wgrad gate_up [E,2I,H]", lambda: gmm(d_gate_up.t(), x, offs=offs), rows * H * 2 * I,
         two * (rows * H + rows * 2 * I + E * 2 * I * H)),
    ]
    out = [(name, fn, 2.0 * flops, nbytes) for name, fn, flops, nbytes in out]
    for name, inp, weight, grad in (("autograd fwd+bwd down", act, down_w, d_out),
                                    ("autograd fwd+bwd gate_up", x, gate_up_w, d_gate_up)):
        inp = inp.detach().requires_grad_()
        weight = weight.detach().requires_grad_()
        flops = 6.0 * rows * weight.shape[1] * weight.shape[2]
        nbytes = two * (3 * inp.numel() + 3 * grad.numel() + 3 * weight.numel())

        def backward(inp=inp, weight=weight, grad=grad):
            inp.grad = weight.grad = None
            gmm(inp, weight.transpose(-2, -1), offs=offs).backward(grad)
        out.append((name, backward, flops, nbytes))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    ceiling = matmul_ceiling_tflops(args.iters)
    bandwidth = copy_bandwidth_gbs(args.iters)
    print(f"{torch.cuda.get_device_name()}: dense bf16 ceiling {ceiling:.0f} TFLOP/s, copy bandwidth "
          f"{bandwidth:.0f} GB/s; Qwen3-30B-A3B experts E={E} H={H} I={I} k={K}")
    for tokens in args.tokens:
        print(f"\nT={tokens} ({tokens * K // E} rows per expert on average)")
        print(f"{'GEMM':<26}{'ms':>8}{'TFLOP/s':>9}{'% ceil':>8}{'GB/s':>7}{'floor ms':>9}{'x floor':>8}")
        for name, fn, flops, nbytes in cases(tokens):
            ms = time_ms(fn, args.iters)
            floor = max(flops / ceiling / 1e9, nbytes / bandwidth / 1e6)
            print(f"{name:<26}{ms:8.3f}{flops / ms / 1e9:9.0f}{100 * flops / ms / 1e9 / ceiling:7.0f}%"
                  f"{nbytes / ms / 1e6:7.0f}{floor:9.3f}{ms / floor:8.2f}")


if __name__ == "__main__":
    main()
