"""The dispatch's sort-and-copy (`expand_by_expert`, PERF_NOTES change 26) against the device's copy bandwidth.

    python benchmarks/dispatch_copy.py [--tokens 4096 16384 65536] [--iters 50] [--sweep]

One Qwen3-30B-A3B layer's dispatch on one GPU: T tokens of width H routed to K distinct experts of E at random,
copied into T*K rows sorted by expert. Printed per T: the kernels' time, their bytes (x read once, the rows written,
the ids read twice) over it, and in the same run the device copy bandwidth (a 1 GiB clone) and the eager path the
kernels replaced (argsort, its inverse, the counts and `index_select`) as references. `--sweep` also times other
tilings of the same two kernels (`ExpandGeometry`: blocks, column split, copy tile, warps), each checked equal to the
default's output first, so that a change of the defaults in framework/ops/triton_kernels.py comes with the numbers.
Times are medians of CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.expert_gemms import copy_bandwidth_gbs, routed_ids
from benchmarks.moe_layer import E, H, K, time_ms
from framework.ops import triton_kernels as tk
from framework.ops.expert_sort import sort_by_expert_reference


def sweep_geometries(n: int, sms: int) -> list[tk.ExpandGeometry]:
    """The default tiling and its neighbours: twice / half the blocks, the column split everywhere or nowhere, the
    copy tile, warps and programs per SM."""
    default = dict(table_reads=tk._TABLE_READS, cols=tk._COPY_COLS, programs_per_sm=tk._COPY_PROGRAMS_PER_SM,
                   max_split_chunks=2, num_warps=8)
    options = {"table_reads": [tk._TABLE_READS // 4, tk._TABLE_READS * 4, tk._TABLE_READS * 16], "cols": [256, 1024],
               "programs_per_sm": [2, 8], "max_split_chunks": [0, 1 << 30], "num_warps": [4, 16]}
    geometries = [tk.expand_geometry(n, E, H, sms, **default)]
    for key, values in options.items():
        for value in values:
            geometry = tk.expand_geometry(n, E, H, sms, **{**default, key: value})
            if geometry not in geometries:
                geometries.append(geometry)
    return geometries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time other tilings of the same kernels")
    args = parser.parse_args()

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = copy_bandwidth_gbs(args.iters)
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, copy bandwidth {bandwidth:.0f} GB/s (1 GiB clone, read+write)")
    print(f"H={H} E={E} K={K}, bf16\n")
    for tokens in args.tokens:
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        ids = routed_ids(tokens)
        n = tokens * K
        moved = (n * H + tokens * H) * x.element_size() + 2 * ids.numel() * ids.element_size()
        want = tk.expand_by_expert(x, ids, E)
        src, inverse, ends = sort_by_expert_reference(ids, E)
        if not (torch.equal(want[0], x[src]) and torch.equal(want[1].view(-1), inverse) and torch.equal(want[2], ends)):
            raise SystemExit(f"T={tokens}: expand_by_expert differs from the stable argsort's rows, inverse or ends")

        def eager():
            src, _, _ = sort_by_expert_reference(ids, E)
            return x.index_select(0, src)

        ms_eager = time_ms(eager, args.iters)
        print(f"T={tokens}: eager argsort + index_select {ms_eager:.3f} ms")
        rows = [("default", tk.expand_geometry(n, E, H, sms))]
        if args.sweep:
            rows += [(f"sweep {i}", g) for i, g in enumerate(sweep_geometries(n, sms)[1:], 1)]
        for label, geometry in rows:
            got = tk.expand_by_expert(x, ids, E, geometry)
            if not all(torch.equal(a, b) for a, b in zip(got, want)):
                raise SystemExit(f"T={tokens} {label} {geometry}: output differs from the default tiling's")
            ms = time_ms(lambda g=geometry: tk.expand_by_expert(x, ids, E, g), args.iters)
            gbs = moved / ms / 1e6
            g = geometry
            print(f"  {label:<9} {ms:7.3f} ms {gbs:6.0f} GB/s = {gbs / bandwidth:4.2f}x copy   blocks {g.blocks:4d} "
                  f"x {g.col_programs} col programs ({g.cols_per_program} cols), {g.chunks_per_block} chunks of "
                  f"{g.chunk}, tile {g.cols}, {g.num_warps} warps;  eager/this {ms_eager / ms:4.2f}x")
        print()


if __name__ == "__main__":
    main()
