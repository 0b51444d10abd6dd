"""End-to-end training throughput through launch/pretrain.py, beside stock DeepSpeed's anchors, in one run.

    python benchmarks/e2e.py --num_gpus 4 --ep 4 [--layers 8] [--seq 4096] [--cases 1:1,4:0] [--steps 12]
        [--backends grouped_mm,megablocks] [--zero_stages 3,2] [--anchors autoep,leaf] [--anchor_script PATH]
        [--data random|demo] [--override section.key=value ...] [--out DIR]

Each row is a separate launch (DeepSpeed's runner, --num_gpus N) of the same model: Qwen3-30B-A3B widths
(model_configs/qwen3-30b-a3b-8l.yaml) at --layers depth, seq --seq, for each --cases entry MBS:GC (micro batch per
GPU : activation checkpointing 1/0), bf16. Ours runs at each of --zero_stages with the shipped "auto" ZeRO settings,
torch's fused AdamW and the YAML's loss_chunk_tokens; the anchors run their own ZeRO-3 with torch AdamW (or
--anchor_adam fused: DeepSpeed's FusedAdam). Ours trains on random tokens like the anchors (--data random:
data.synthetic) or on the demo corpus (--data demo: real text, whose uneven routing makes expert parallelism wait).
Both count model FLOPs with the same formula (framework/train/flops.py, printed below). Throughput is the median over
the steps after --warmup; memory is torch.cuda.max_memory_allocated (max over ranks for ours, rank 0 for the anchors,
whose ranks are symmetric). The table also gives each row's first and last loss (falling).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "model_configs", "qwen3-30b-a3b-8l.yaml")
FORMULA = ("model FLOPs/token = 6 x (per layer: q,k,v,o projections + top-k experts' 3 matrices + router; + LM head)"
           " + 6 x layers x seq x heads x head_dim (causal attention)")


def runner(num_gpus: int, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port", str(port)]


def run_ours(args, what: tuple[str, int], out: str, port: int) -> dict:
    backend, stage = what
    data = ["data.synthetic=true"] if args.data == "random" else [f"data.paths=[{demo_text_folder(args.out)}]"]
    overrides = [f"model.num_layers={args.layers}", f"data.seq_len={args.seq}", *data,
                 f"train.micro_batch_size={args.mbs}", f"train.global_batch_size={args.mbs * args.num_gpus}",
                 f"train.activation_checkpointing={'true' if args.gc else 'false'}", f"moe.backend={backend}",
                 f"parallel.ep_size={args.ep}", f"parallel.zero_stage={stage}",
                 f"train.max_steps={args.steps + args.profile_steps}", "train.log_steps=1",
                 "train.save_steps=0", "train.save_at_end=false", "export.at_end=false", "train.progress_bar=false",
                 "train.tensorboard=false",
                 # the anchors' optimizer settings: constant lr 1e-4, no warmup (a higher lr collapses the random-token
                 # routing onto a few experts within ten steps, which measures imbalance rather than the code)
                 "train.lr=1e-4", "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0.01",
                 f"train.output_dir={out}", *args.override]
    if args.profile_steps:  # traced after the timed steps, so the profiler's overhead stays out of the medians
        overrides.append(f"train.profile_steps=[{args.steps + 1},{args.steps + args.profile_steps}]")
    cmd = runner(args.num_gpus, port) + [os.path.join(REPO, "launch", "pretrain.py"), "--config", args.config]
    cmd += (["--deepspeed", args.deepspeed] if args.deepspeed else []) + overrides
    log = _run(cmd, os.path.join(out + ".log"), {})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    timed = steps[args.warmup:args.steps]
    return {"row": f"ours {backend} ep{args.ep} z{stage}",
            "tokens_per_s_per_gpu": statistics.median(s["tokens_per_s_per_gpu"] for s in timed),
            "tflops_per_gpu": statistics.median(s["tflops_per_gpu"] for s in timed),
            "mem_gb": max(s["mem_gb"] for s in steps), "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "steps": len(steps), "log": log}


def demo_text_folder(out: str) -> str:
    """The demo corpus as one .txt file per document: plain text needs neither datasets nor pyarrow, which the offline
    GPU image lacks."""
    from framework.data.demo import demo_documents  # noqa: PLC0415

    folder = os.path.abspath(os.path.join(out, "demo_txt"))
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for i, doc in enumerate(demo_documents()):
            with open(os.path.join(folder + ".tmp", f"{i:05d}.txt"), "w") as f:
                f.write(doc["text"])
        os.rename(folder + ".tmp", folder)
    return folder


def run_anchor(args, mode: str, out: str, port: int) -> dict:
    env = {"MODE": mode, "LAYERS": str(args.layers), "SEQ": str(args.seq), "MBS": str(args.mbs),
           "GC": "1" if args.gc else "0", "ADAM": args.anchor_adam}
    log = _run(runner(args.num_gpus, port) + [args.anchor_script], out + ".log", env)
    with open(log) as f:
        lines = [line for line in f if line.startswith("RESULT ")]
    if not lines:
        return {"row": f"anchor {mode}", "error": f"no RESULT line; see {log}"}
    r = json.loads(lines[-1][len("RESULT "):])
    return {"row": f"anchor {mode}" + (f" ep{args.num_gpus}" if mode == "autoep" else "") + f" {args.anchor_adam}Adam",
            "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "tflops_per_gpu": r["model_tflops_per_gpu"],
            "mem_gb": r["max_mem_gb"], "first_loss": r["losses"][0], "last_loss": r["losses"][-1],
            "steps": len(r["losses"]), "log": log}


def _run(cmd: list[str], log: str, env: dict[str, str]) -> str:
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO)
    print(f"[{time.time() - start:.0f} s] rc={proc.returncode} {' '.join(cmd[-3:])} -> {log}", flush=True)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"run failed (rc={proc.returncode}), log {log}:\n{tail}")
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="the run YAML whose model is benchmarked")
    p.add_argument("--num_gpus", type=int, default=4)
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--cases", default="1:1", help="comma-separated MBS:GC pairs, e.g. 1:1,4:0")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="run this many more steps under torch.profiler (OUT/<row>/profile), untimed")
    p.add_argument("--backends", default="grouped_mm")
    p.add_argument("--zero_stages", default="3")
    p.add_argument("--anchors", default="autoep")
    p.add_argument("--anchor_adam", default="torch", choices=["torch", "fused"])
    p.add_argument("--anchor_script", default=os.path.join(REPO, "..", "shared", "anchors", "deepspeed_e2e.py"))
    p.add_argument("--data", default="random", choices=["random", "demo"],
                   help="our input: random tokens like the anchors (default) or the demo corpus's real text")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON for our runs (default: the shipped one)")
    p.add_argument("--override", action="append", default=[], help="extra section.key=value for our runs")
    p.add_argument("--out", default="e2e_results")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
    ours = [(b, int(z)) for b in args.backends.split(",") if b for z in args.zero_stages.split(",")]
    tables = []
    port = 29601
    for mbs, gc in cases:
        args.mbs, args.gc = mbs, gc
        rows = []
        jobs = [(f"ours {b} z{z}", run_ours, (b, z), f"ours-{b}-z{z}-mbs{mbs}-gc{gc}") for b, z in ours]
        jobs += [(f"anchor {m}", run_anchor, m, f"anchor-{m}-mbs{mbs}-gc{gc}") for m in args.anchors.split(",") if m]
        for label, run, what, name in jobs:
            port += 1
            try:
                rows.append(run(args, what, os.path.abspath(os.path.join(args.out, name)), port))
            except RuntimeError as e:
                rows.append({"row": label, "error": str(e)[-500:]})
            print("ROW", json.dumps({"mbs": mbs, "gc": gc, **rows[-1]}), flush=True)
        tables.append((mbs, gc, rows))
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump({"args": vars(args), "cases": [{"mbs": m, "gc": g, "rows": r} for m, g, r in tables]}, f, indent=2)
    import torch  # noqa: PLC0415

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{args.num_gpus}x {card}, layers={args.layers} seq={args.seq}, "
          f"median of steps {args.warmup + 1}-{args.steps}\n{FORMULA}")
    for mbs, gc, rows in tables:
        print(f"\nmbs={mbs} gc={gc}\n{'row':<34}{'tok/s/GPU':>11}{'TFLOP/s/GPU':>13}{'mem GB':>8}{'loss 1st':>10}"
              f"{'loss last':>10}")
        base = next((r for r in rows if r["row"].startswith("anchor") and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"{r['row']:<34} FAILED: {r['error'][-300:]}")
                continue
            ratio = f"  {r['tflops_per_gpu'] / base['tflops_per_gpu']:.2f}x {base['row']}" if base else ""
            print(f"{r['row']:<34}{r['tokens_per_s_per_gpu']:>11.0f}{r['tflops_per_gpu']:>13.1f}{r['mem_gb']:>8.1f}"
                  f"{r['first_loss']:>10.4f}{r['last_loss']:>10.4f}{ratio}")


if __name__ == "__main__":
    main()
