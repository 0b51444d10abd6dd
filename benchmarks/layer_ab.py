#!/usr/bin/env python
"""A/B of the MoE layer between this tree and another copy of the code (an older commit's `git archive`), on one GPU.

    python benchmarks/layer_ab.py --baseline DIR [--rounds 3] [--tokens 4096 16384] [--iters 20]

Runs `benchmarks/moe_layer.py --backends grouped_mm --overheads` alternately in both trees, `--rounds` times each, the
order swapped every round (ABBA...), and prints per token count the median over rounds of each tree's synced step,
host enqueue, kernel time, kernels per step and the GiB its forward keeps (nan from a moe_layer.py without it), and
the candidate's change. One process per run, so each tree imports its own `framework`. Why rounds: on a shared GPU
machine the host's speed drifts between processes (session 12 saw the same transformers block enqueue in 4.86-6.11
ms across four runs), which one run per tree cannot tell from a change; the stock block's host enqueue is printed
beside as that drift's gauge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OURS = "ours:grouped_mm"
STOCK = "transformers-5 grouped_mm block"


class Stopped(Exception):
    """SIGTERM arrived."""


def _stop(_signum, _frame):
    raise Stopped


def run_layer(tree: Path, tokens: list[int], iters: int) -> dict:
    """One moe_layer.py run in `tree`: its JSON ({"ceiling_tflops", "rows": [...]})."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "layer.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "benchmarks/moe_layer.py", "--backends", "grouped_mm", "--overheads",
               "--iters", str(iters), "--out", str(out), "--tokens", *map(str, tokens)]
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"moe_layer.py failed in {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def rows_of(runs: list[dict], tokens: int, impl: str) -> list[dict]:
    """The rows of `impl` at `tokens` tokens in these runs, in run order."""
    return [r for run in runs for r in run["rows"] if r["tokens"] == tokens and r["impl"] == impl]


def summarize(runs: list[dict], tokens: int) -> dict:
    """Medians over runs of one tree at one token count."""
    ours, stock = rows_of(runs, tokens, OURS), rows_of(runs, tokens, STOCK)
    med = statistics.median
    return {"synced": med(r["ms"] for r in ours), "host": med(r["overheads"]["enqueue_ms"] for r in ours),
            "kernels": med(r["overheads"]["kernel_ms"] for r in ours),
            "launches": med(r["overheads"]["kernels"] for r in ours),
            "pct": med(100 * r["ceiling_ms"] / r["ms"] for r in ours),
            "kept": med(r.get("kept_gib", float("nan")) for r in ours),
            "stock_host": [round(r["overheads"]["enqueue_ms"], 2) for r in stock]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the other tree (e.g. a `git archive` of main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    trees = {"candidate": Path(__file__).resolve().parents[1], "baseline": Path(args.baseline).resolve()}
    if not (trees["baseline"] / "benchmarks" / "moe_layer.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no benchmarks/moe_layer.py there; pass a copy of the code")
    runs: dict[str, list[dict]] = {"candidate": [], "baseline": []}
    # A SIGTERM (`timeout`) still prints the medians of the runs done so far.
    signal.signal(signal.SIGTERM, _stop)
    try:
        for r in range(args.rounds):
            order = ["candidate", "baseline"] if r % 2 == 0 else ["baseline", "candidate"]
            for name in order:
                run = run_layer(trees[name], args.tokens, args.iters)
                runs[name].append(run)
                print(f"round {r + 1} {name}: " + "; ".join(run_line(run, t) for t in args.tokens), flush=True)
    except Stopped:
        print("stopped: medians of the runs done so far", flush=True)
    if all(runs.values()):
        print_medians(runs, args.tokens)


def run_line(run: dict, tokens: int) -> str:
    ours, stock = rows_of([run], tokens, OURS)[0], rows_of([run], tokens, STOCK)
    o = ours["overheads"]
    gauge = f" stock host {stock[0]['overheads']['enqueue_ms']:.2f}" if stock else ""
    return (f"T={tokens} synced {ours['ms']:.2f} host {o['enqueue_ms']:.2f} kernels {o['kernel_ms']:.2f} "
            f"#k {o['kernels']}{gauge}")


def print_medians(runs: dict[str, list[dict]], tokens: list[int]) -> None:
    counts = {name: len(r) for name, r in runs.items()}
    print(f"\nmedians of {counts} runs per tree (ms per forward+backward); stock block's host enqueue per run "
          "gauges the host's drift")
    print(f"{'T':>6} {'tree':<10} {'synced':>7} {'%ceil':>6} {'host':>6} {'kernels':>8} {'#k':>4} {'kept':>6}"
          "  stock host")
    for t in tokens:
        s = {name: summarize(runs[name], t) for name in runs}
        for name, v in s.items():
            print(f"{t:>6} {name:<10} {v['synced']:7.2f} {v['pct']:5.0f}% {v['host']:6.2f} {v['kernels']:8.2f} "
                  f"{v['launches']:4.0f} {v['kept']:6.2f}  {v['stock_host']}")
        c, b = s["candidate"], s["baseline"]
        print(f"{t:>6} {'change':<10} {100 * (c['synced'] / b['synced'] - 1):+6.1f}% {'':6} "
              f"{c['host'] - b['host']:+6.2f} {c['kernels'] - b['kernels']:+8.2f} "
              f"{c['launches'] - b['launches']:+4.0f} {c['kept'] - b['kept']:+6.2f}")


if __name__ == "__main__":
    main()
