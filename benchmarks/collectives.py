"""Per-GPU bus bandwidth of the collectives an expert-parallel ZeRO step runs: the rates `tools/tune_zero.py time`
takes as --intra_gbs and --inter_gbs.

    torchrun --nproc_per_node 8 [--nnodes N --node_rank R --master_addr A --master_port P] \\
        benchmarks/collectives.py [--ep_size 8] [--mb 256] [--iters 20] [--out result.json]

Groups laid out as the trainer's (framework/parallel/groups.py): EP groups of consecutive ranks, inside a node; EDP
groups of ranks r, r + EP, r + 2 EP, ... (across nodes when there are several); and the world. Timed, each on its
group: the expert dispatch's `all_to_all_single` over the EP group, and ZeRO's `all_gather_into_tensor` and
`reduce_scatter_tensor` over the world (dense parameters) and over the EDP group (experts). `--mb` is the size of the
whole tensor (the gathered one; for the all-to-all, what each rank sends), bf16. Bus bandwidth as nccl-tests defines
it, MB x (n-1)/n / time, which is what framework/tuning/step_time.py divides its bytes by. Each iteration starts after
a barrier and its time is the slowest rank's; the median of --iters after warm-up is reported. NCCL on GPUs, gloo on
CPU (where only the bookkeeping means anything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from framework.checkpoint.atomic_dir import write_text_atomic


def make_groups(world: int, ep_size: int) -> tuple[object, object, list[int], list[int]]:
    """(this rank's EP group, its EDP group, their ranks). Every rank creates every group, in the same order, as
    torch.distributed requires."""
    rank = dist.get_rank()
    mine = {}
    for kind, layouts in (("ep", [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]),
                          ("edp", [list(range(r, world, ep_size)) for r in range(ep_size)])):
        for ranks in layouts:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = (group, ranks)
    return mine["ep"][0], mine["edp"][0], mine["ep"][1], mine["edp"][1]


def timed(fn: Callable[[], object], group, iters: int, device: torch.device) -> float:
    """Median over `iters` (after 3 warm-up calls) of the slowest rank's seconds for one call of `fn`."""
    times = []
    for i in range(iters + 3):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.tolist())


def measure(ep_size: int, megabytes: float, iters: int, gpus_per_node: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size or ep_size > gpus_per_node:
        raise SystemExit(f"--ep_size {ep_size}: must divide the {world} ranks and fit in a node of {gpus_per_node}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    ep_group, edp_group, ep_ranks, edp_ranks = make_groups(world, ep_size)
    numel = int(megabytes * 1e6 / 2) // (world * ep_size) * (world * ep_size)  # divisible by every group size
    rows = []
    cases = [("all_to_all", "EP", ep_group, ep_ranks), ("all_gather", "world", None, list(range(world))),
             ("reduce_scatter", "world", None, list(range(world))), ("all_gather", "EDP", edp_group, edp_ranks),
             ("reduce_scatter", "EDP", edp_group, edp_ranks)]
    for op, label, group, ranks in cases:
        n = len(ranks)
        if n == 1:
            continue  # nothing crosses a link
        full = torch.ones(numel, dtype=torch.bfloat16, device=device)
        part = torch.ones(numel // n, dtype=torch.bfloat16, device=device)
        if op == "all_to_all":
            out, expected = torch.empty_like(full), 1.0
            fn = lambda: dist.all_to_all_single(out, full, group=group)  # noqa: E731
        elif op == "all_gather":
            out, expected = full, 1.0
            fn = lambda: dist.all_gather_into_tensor(full, part, group=group)  # noqa: E731
        else:
            out, expected = part, float(n)  # the sum of n ranks' ones
            fn = lambda: dist.reduce_scatter_tensor(part, full, group=group)  # noqa: E731
        seconds = timed(fn, group, iters, device)
        if not torch.all(out == expected):  # a wrong group or size would time the wrong thing
            raise SystemExit(f"{op} over {label} gave values other than {expected:g}")
        nodes = {r // gpus_per_node for r in ranks}
        rows.append({"op": op, "group": label, "ranks": n, "spans_nodes": len(nodes) > 1,
                     "megabytes": 2 * numel / 1e6, "ms": 1e3 * seconds,
                     "bus_gbs": 2 * numel * (n - 1) / n / seconds / 1e9})
    intra = [r["bus_gbs"] for r in rows if r["op"] == "all_to_all"]
    inter = [r["bus_gbs"] for r in rows if r["op"] != "all_to_all" and r["spans_nodes"]]
    return {"world": world, "ep_size": ep_size, "gpus_per_node": gpus_per_node, "device": device.type,
            "rank": rank, "rows": rows, "intra_gbs": min(intra) if intra else None,
            "inter_gbs": min(inter) if inter else None}


def report(result: dict) -> str:
    lines = [f"{result['world']} ranks ({result['gpus_per_node']} per node), EP {result['ep_size']}, "
             f"{result['device']}; bus bandwidth = MB x (n-1)/n / time, slowest rank, median",
             f"{'collective':<16}{'group':<7}{'ranks':>6}  {'spans nodes':<12}{'MB':>8}{'ms':>9}{'GB/s':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['op']:<16}{r['group']:<7}{r['ranks']:>6}  {'yes' if r['spans_nodes'] else 'no':<12}"
                     f"{r['megabytes']:>8.1f}{r['ms']:>9.3f}{r['bus_gbs']:>9.1f}")
    flags = []
    if result["intra_gbs"] is not None:
        flags.append(f"--intra_gbs {result['intra_gbs']:.0f}")
    if result["inter_gbs"] is not None:
        flags.append(f"--inter_gbs {result['inter_gbs']:.0f}")
    lines.append("for tools/tune_zero.py time: " + (" ".join(flags) if flags else
                                                    "nothing measured (one rank per group)"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep_size", type=int, help="expert-parallel size (default: the ranks of one node)")
    parser.add_argument("--mb", type=float, default=256.0, help="MB of the whole tensor per collective (bf16)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--gpus_per_node", type=int, help="ranks per node (default: torchrun's LOCAL_WORLD_SIZE)")
    parser.add_argument("--out", help="also write the result as JSON here (rank 0)")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    gpus_per_node = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    result = measure(args.ep_size or gpus_per_node, args.mb, args.iters, gpus_per_node)
    if dist.get_rank() == 0:
        print(report(result), flush=True)
        if args.out:
            write_text_atomic(args.out, json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
