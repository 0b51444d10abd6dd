"""End-to-end training throughput through launch/pretrain.py, beside stock DeepSpeed's anchors, in one run.

    python benchmarks/e2e.py --num_gpus 4 --ep 4 [--layers 8] [--seq 4096] [--cases 1:1,4:0] [--steps 12]
        [--backends grouped_mm,megablocks] [--zero_stages 3,2] [--anchors autoep,leaf] [--anchor_script PATH]
        [--data random|demo] [--repeats N] [--override section.key=value ...]
        [--variant LABEL:section.key=value[;...] ...] [--out DIR]
    python benchmarks/e2e.py --config model_configs/moonlight-16b-a3b.yaml --num_gpus 1 --ep 1 --layers 4 \
        --anchors family          # another family: the plain ZeRO-3 anchor on its stock model (anchor_family.py)

Each row is a separate launch (DeepSpeed's runner, --num_gpus N) of the same model: Qwen3-30B-A3B widths
(model_configs/qwen3-30b-a3b-8l.yaml) at --layers depth, seq --seq, for each --cases entry MBS:GC (micro batch per
GPU : activation checkpointing 1/0, or moe / attention for ours to recompute only that half of each layer while the
anchors recompute whole layers), bf16. Ours runs at each of --zero_stages with the shipped "auto" ZeRO settings,
torch's fused AdamW and the YAML's loss_chunk_tokens; the anchors run their own ZeRO-3 with torch AdamW (or
--anchor_adam fused: DeepSpeed's FusedAdam). Ours trains on random tokens like the anchors (--data random:
data.synthetic) or on the demo corpus (--data demo: real text, whose uneven routing makes expert parallelism wait).
Both count model FLOPs with the same formula (framework/train/flops.py, printed below). Throughput is the median over
the steps after --warmup; memory is torch.cuda.max_memory_allocated (max over ranks for ours, rank 0 for the anchors,
whose ranks are symmetric). The table also gives each row's first and last loss (falling).
--repeats N launches every row N times, interleaved (ours, anchors, ours, anchors, ...), and reports the median of the
runs' medians with their range: the same code measured 256-288 TFLOP/s/GPU in three launches on one 2x H200 machine
(benchmarks/PERF_NOTES.md, session 5), so a few-percent difference needs repeats to be told from noise.
--variant LABEL:OVERRIDES adds, for every backend and ZeRO stage, a row of ours with those overrides (';'-separated
section.key=value; `deepspeed=PATH` runs that row with another DeepSpeed JSON), launched interleaved with the rest and
compared with the same row without them: an A/B of one setting on one machine in one call, e.g.
`--variant chunks2:parallel.ep_chunks=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.launching import REPO, Failure, free_port, run_logged, runner  # noqa: E402

CONFIG = os.path.join(REPO, "model_configs", "qwen3-30b-a3b-8l.yaml")
FAMILY_ANCHOR = os.path.join(REPO, "benchmarks", "anchor_family.py")
# --cases GC: ours recomputes whole layers (1), only the MoE or attention half (moe, attention) or nothing (0); the
# anchors recompute whole layers for any GC but 0
CHECKPOINTING = {"1": "true", "0": "false", "moe": "moe", "attention": "attention"}
FORMULA = ("model FLOPs/token = 6 x the matmul parameters a token touches (attention projections, top-k of the routed "
           "experts, router, shared experts, dense MLPs, LM head) + causal attention scores (framework/train/flops.py)")


def run_ours(args, what: tuple[str, int, str, list[str]], out: str, port: int) -> dict:
    backend, stage, variant, extra = what
    deepspeed = next((o.split("=", 1)[1] for o in extra if o.startswith("deepspeed=")), args.deepspeed)
    extra = [o for o in extra if not o.startswith("deepspeed=")]
    data = ["data.synthetic=true"] if args.data == "random" else [f"data.paths=[{demo_text_folder(args.out)}]"]
    overrides = [f"model.num_layers={args.layers}", f"data.seq_len={args.seq}", *data,
                 f"train.micro_batch_size={args.mbs}", f"train.global_batch_size={args.mbs * args.num_gpus}",
                 f"train.activation_checkpointing={CHECKPOINTING[args.gc]}", f"moe.backend={backend}",
                 f"parallel.ep_size={args.ep}", f"parallel.zero_stage={stage}",
                 f"train.max_steps={args.steps + args.profile_steps}", "train.log_steps=1",
                 "train.save_steps=0", "train.save_at_end=false", "export.at_end=false", "train.progress_bar=false",
                 "train.tensorboard=false",
                 # the anchors' optimizer settings: constant lr 1e-4, no warmup (a higher lr collapses the random-token
                 # routing onto a few experts within ten steps, which measures imbalance rather than the code)
                 "train.lr=1e-4", "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0.01",
                 f"train.output_dir={out}", *args.override, *extra]
    if args.profile_steps:  # traced after the timed steps, so the profiler's overhead stays out of the medians
        overrides.append(f"train.profile_steps=[{args.steps + 1},{args.steps + args.profile_steps}]")
    cmd = runner(args.num_gpus, port) + [os.path.join(REPO, "launch", "pretrain.py"), "--config", args.config]
    cmd += (["--deepspeed", deepspeed] if deepspeed else []) + overrides
    log = run_logged(cmd, out + ".log")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    timed = steps[args.warmup:args.steps]
    plain = f"ours {backend} ep{args.ep} z{stage}"
    return {"row": plain + (f" [{variant}]" if variant else ""), "variant": variant, "plain_row": plain,
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


def jit_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed 0.19.8's JIT op builder can read it. Its compute_capability_args parses each
    entry as numbers, so an arch-specific entry such as "9.0a" (what the CUDA 13 torch images set) fails the
    FusedAdam build of `--anchor_adam fused` with "ValueError: invalid literal for int() with base 10: '0a'"."""
    return re.sub(r"(\d+\.\d+)a\b", r"\1", arch_list)


def run_anchor(args, mode: str, out: str, port: int) -> dict:
    env = {"MODE": mode, "LAYERS": str(args.layers), "SEQ": str(args.seq), "MBS": str(args.mbs),
           "GC": "0" if args.gc == "0" else "1", "ADAM": args.anchor_adam, "CONFIG": args.config}
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        env["TORCH_CUDA_ARCH_LIST"] = jit_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    # "family": plain ZeRO-3 on the stock model of --config, whatever its family (benchmarks/anchor_family.py)
    script = FAMILY_ANCHOR if mode == "family" else args.anchor_script
    log = run_logged(runner(args.num_gpus, port) + [script], out + ".log", env=env)
    with open(log) as f:
        lines = [line for line in f if line.startswith("RESULT ")]
    if not lines:
        return {"row": f"anchor {mode}", "error": f"no RESULT line; see {log}"}
    r = json.loads(lines[-1][len("RESULT "):])
    return {"row": f"anchor {mode}" + (f" ep{args.num_gpus}" if mode == "autoep" else "") + f" {args.anchor_adam}Adam",
            "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"], "tflops_per_gpu": r["model_tflops_per_gpu"],
            "mem_gb": r["max_mem_gb"], "first_loss": r["losses"][0], "last_loss": r["losses"][-1],
            "steps": len(r["losses"]), "log": log}


def combine_repeats(results: list[dict]) -> dict:
    """One table row from the launches of one row: the median of their median throughputs, their TFLOP/s range, the
    highest memory; the first launch's losses (every launch trains the same steps). A failed launch fails the row."""
    failed = [r for r in results if "error" in r]
    if failed:
        return {**failed[0], "error": f"{len(failed)} of {len(results)} launches failed; first: {failed[0]['error']}"}
    tflops = [r["tflops_per_gpu"] for r in results]
    return {**results[0], "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_gpu"] for r in results),
            "tflops_per_gpu": statistics.median(tflops), "tflops_range": [min(tflops), max(tflops)],
            "mem_gb": max(r["mem_gb"] for r in results), "launches": len(results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="the run YAML whose model is benchmarked")
    p.add_argument("--num_gpus", type=int, default=4)
    p.add_argument("--ep", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--cases", default="1:1", help="comma-separated MBS:GC pairs, e.g. 1:1,4:0,1:moe")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="run this many more steps under torch.profiler (OUT/<row>/profile), untimed")
    p.add_argument("--backends", default="grouped_mm")
    p.add_argument("--zero_stages", default="3")
    p.add_argument("--anchors", default="autoep",
                   help="autoep, leaf (the shared anchor: Qwen3-30B-A3B widths only), family (--config's model)")
    p.add_argument("--anchor_adam", default="torch", choices=["torch", "fused"])
    p.add_argument("--anchor_script", default=os.path.join(REPO, "..", "shared", "anchors", "deepspeed_e2e.py"))
    p.add_argument("--data", default="random", choices=["random", "demo"],
                   help="our input: random tokens like the anchors (default) or the demo corpus's real text")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON for our runs (default: the shipped one)")
    p.add_argument("--override", action="append", default=[], help="extra section.key=value for our runs")
    p.add_argument("--variant", action="append", default=[],
                   help="LABEL:section.key=value[;...] (or deepspeed=PATH): also run ours with these, as its own row")
    p.add_argument("--repeats", type=int, default=1, help="launch every row this many times, interleaved")
    p.add_argument("--out", default="e2e_results")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    shared_anchors = [m for m in args.anchors.split(",") if m in ("autoep", "leaf")]
    if shared_anchors and not os.path.isfile(args.anchor_script):
        p.error(f"--anchors {','.join(shared_anchors)} needs the shared anchor script, not found at "
                f"{args.anchor_script}; pass --anchor_script PATH (a copy of deepspeed_e2e.py next to the repo)")
    variants = [("", [])]
    for spec in args.variant:
        label, _, settings = spec.partition(":")
        extra = [o for o in settings.split(";") if o]
        if (not re.fullmatch(r"[\w.-]+", label) or not extra or any("=" not in o for o in extra)
                or label in {v for v, _ in variants}):
            p.error(f"--variant {spec!r}: expected LABEL:section.key=value[;section.key=value...] (or "
                    "LABEL:deepspeed=PATH), LABEL new and of letters, digits, '.', '_', '-'")
        variants.append((label, extra))
    ours = [(b, int(z), v, extra) for b in args.backends.split(",") if b for z in args.zero_stages.split(",")
            for v, extra in variants]
    cases = []
    for case in args.cases.split(","):
        mbs, _, gc = case.partition(":")
        if not mbs.isdigit() or gc not in CHECKPOINTING:
            p.error(f"--cases {case!r}: expected MBS:GC with GC one of {', '.join(CHECKPOINTING)}")
        cases.append((int(mbs), gc))
    os.makedirs(args.out, exist_ok=True)
    tables = []
    for mbs, gc in cases:
        args.mbs, args.gc = mbs, gc
        jobs = [(f"ours {b} z{z} {v}", run_ours, (b, z, v, extra),
                 f"ours-{b}-z{z}{'-' + v if v else ''}-mbs{mbs}-gc{gc}") for b, z, v, extra in ours]
        jobs += [(f"anchor {m}", run_anchor, m, f"anchor-{m}-mbs{mbs}-gc{gc}") for m in args.anchors.split(",") if m]
        launches: dict[str, list[dict]] = {label: [] for label, *_ in jobs}
        for repeat in range(1, args.repeats + 1):
            for label, run, what, name in jobs:
                name += f"-r{repeat}" if args.repeats > 1 else ""
                try:
                    result = run(args, what, os.path.abspath(os.path.join(args.out, name)), free_port())
                except Failure as e:
                    result = {"row": label, "error": str(e)[-500:]}
                launches[label].append(result)
                print("ROW", json.dumps({"mbs": mbs, "gc": gc, "repeat": repeat, **result}), flush=True)
        tables.append((mbs, gc, [combine_repeats(results) for results in launches.values()]))
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump({"args": vars(args), "cases": [{"mbs": m, "gc": g, "rows": r} for m, g, r in tables]}, f, indent=2)
    import torch  # noqa: PLC0415

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{args.num_gpus}x {card}, layers={args.layers} seq={args.seq}, median of steps "
          f"{args.warmup + 1}-{args.steps}" + (f", median of {args.repeats} launches (TFLOP/s range)"
                                               if args.repeats > 1 else "") + f"\n{FORMULA}")
    for mbs, gc, rows in tables:
        print(f"\nmbs={mbs} gc={gc}\n{'row':<34}{'tok/s/GPU':>11}{'TFLOP/s/GPU':>13}{'mem GB':>8}{'loss 1st':>10}"
              f"{'loss last':>10}")
        base = next((r for r in rows if r["row"].startswith("anchor") and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"{r['row']:<34} FAILED: {r['error'][-300:]}")
                continue
            ratio = f"  {r['tflops_per_gpu'] / base['tflops_per_gpu']:.2f}x {base['row']}" if base else ""
            plain = next((o for o in rows if r.get("variant") and o["row"] == r["plain_row"] and "error" not in o),
                         None)
            if plain:  # a --variant row: against the same row without it
                ratio += f"  {r['tflops_per_gpu'] / plain['tflops_per_gpu']:.3f}x without [{r['variant']}]"
            spread = " ({:.1f}-{:.1f})".format(*r["tflops_range"]) if r["launches"] > 1 else ""
            print(f"{r['row']:<34}{r['tokens_per_s_per_gpu']:>11.0f}{r['tflops_per_gpu']:>13.1f}{r['mem_gb']:>8.1f}"
                  f"{r['first_loss']:>10.4f}{r['last_loss']:>10.4f}{ratio}{spread}")


if __name__ == "__main__":
    main()
