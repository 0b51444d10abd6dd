"""Full-model checks through `launch/pretrain.py` (issue #8): resume, export round trip, memory against the estimate.

Issue #8, on one node of 8 GPUs (Qwen3-30B-A3B at full depth: 48 layers, 128 experts, random init, seq 4096):

    python benchmarks/full_model.py --num_gpus 8 --ep 8 --zero_stage 3 --out runs/issue8-z3 \\
        --tolerance 1e-3 --override train.global_batch_size=8
    python benchmarks/full_model.py --num_gpus 8 --ep 8 --zero_stage 2 --out runs/issue8-z2 \\
        --tolerance 1e-3 --override train.global_batch_size=8
    python benchmarks/e2e.py --num_gpus 8 --ep 8 --layers 48 --zero_stages 3,2      # throughput beside AutoEP

(`train.global_batch_size=8` = micro batch 1 x 8 GPUs, one micro batch per step, as e2e.py runs; the YAML's 64 works
too, 8x slower per step.) Disk: every checkpoint of the full model holds fp32 master weights + Adam m, v (12 bytes a
parameter, 14 with ZeRO-1/2's bf16 module copy): ~370 GB each at 30.5 B parameters (~430 GB with ZeRO-2), two of them
(step N and the end) plus three bf16 HF copies (~61 GB each): ~0.96 TB under --out for ZeRO-3 (~0.83 TB with
--cleanup, which deletes each artefact once it has been checked). The script prints what it needs and stops before
launching anything if --out's filesystem has less (exit 2; --skip_disk_check to try anyway). Where the disk is smaller
(the lent 8-GPU machines have 235 GB), run the memory check at full depth with --memory_only (no checkpoint, no
export) and the resume/export checks at a depth that fits, `--override model.num_layers=8` (~0.18 TB, ~0.15 TB with
--cleanup):

    python benchmarks/full_model.py --num_gpus 8 --ep 8 --zero_stage 3 --out runs/issue8-z3-mem --memory_only \
        --override train.global_batch_size=8
    python benchmarks/full_model.py --num_gpus 8 --ep 8 --zero_stage 3 --out runs/issue8-z3-8l --tolerance 1e-3 \
        --cleanup --override train.global_batch_size=8 --override model.num_layers=8

What runs (every launch gets the same --config, --override list, process count, EP size and ZeRO stage; random tokens,
data.synthetic=true, so no corpus is needed):
  Run A   OUT/a: `steps` optimizer steps, a checkpoint at step --save_at and at the end, metrics every step, and an
          HF export at the end (export.format=hf: the hub's per-expert tensors, written from the live ZeRO weights).
  Run B   OUT/b: a new run resumed from OUT/a/checkpoints/step_N (`--resume PATH`), trained to `steps`; nothing is
          written into OUT/a (checked: every file under OUT/a keeps its size and mtime).
Checks (each prints PASS/FAIL; the exit status is 1 if any fails, 2 for a usage / disk problem):
  resume  run B's steps N+1..steps have the loss, lm_loss, aux_loss, grad_norm and lr of run A's same steps
          (metrics.jsonl): max relative difference <= --tolerance. On CPU (gloo, fp32) this is exact, --tolerance 0.
          On GPUs give a small relative tolerance (e.g. 1e-3): flash-attention's backward and NCCL's reductions are
          not bit-reproducible (atomics, reduction order), so gradients and the steps after them differ in the last
          bits of bf16. The max relative difference is printed whatever the tolerance.
  export  tools/moe_merge.py turns OUT/a/hf (per-expert) into OUT/a/hf_merged (fused); tools/ds_to_hf.py --format
          merged turns run A's final checkpoint (the fp32 masters ZeRO holds, cast to the training dtype) into
          OUT/a/ckpt_merged. Equal = the same key set and torch.equal (same dtype, shape, bits) for every tensor;
          the counts and the first mismatch are printed.
  memory  peak memory per GPU measured by run A (metrics.jsonl mem_gb: torch.cuda.max_memory_allocated, max over ranks
          and steps; also before the first save, since a save may add its own peak) beside `tools/tune_zero.py
          estimate` for the same config, overrides, processes, EP, stage and micro batch.
          Reported, not a pass/fail check. On CPU the measured value is the processes' peak RSS: not comparable.
The table at the end also gives run A's median tokens/s/GPU and model TFLOP/s/GPU (steps 2..steps, without the step
after the save, whose time includes it). Logs of every launch are under OUT (a.log, b.log, ...); OUT/summary.json
holds the numbers. Phases that finished in an earlier call (run A, run B, the conversions) are reused with --reuse,
so a run cut off by a time limit can be continued with the same command plus --reuse (an unfinished phase starts
again; --timeout bounds each launch).

    python benchmarks/full_model.py [--config model_configs/qwen3-30b-a3b.yaml] [--num_gpus 8] [--ep 8]
        [--zero_stage 3] [--steps 6] [--save_at 3] [--out runs/full_model] [--override section.key=value ...]
        [--deepspeed JSON] [--tolerance 0] [--memory_only] [--cleanup] [--reuse] [--skip_disk_check]

Processes start like e2e.py's runs: DeepSpeed's runner (`--num_gpus N`) for N > 1, plain python for N = 1. Without
CUDA the same runner starts N CPU processes that use gloo, as tests/distributed/test_pretrain.py does; the CPU test
(tests/distributed/test_full_model_check.py) runs model_configs/tiny.yaml on 2 processes, EP=2, ZeRO-3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from benchmarks.launching import Failure, free_port, run_logged, runner  # noqa: E402

CONFIG = os.path.join(REPO, "model_configs", "qwen3-30b-a3b.yaml")
PRETRAIN = os.path.join(REPO, "launch", "pretrain.py")
COMPARED = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")


def die(message: str) -> None:
    """A usage or disk problem: one line, exit status 2, before (or instead of) launching anything."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def launcher(num_gpus: int) -> list[str]:
    """DeepSpeed's runner for several processes (CUDA or, without it, CPU processes on gloo); python for one."""
    return [sys.executable] if num_gpus == 1 else runner(num_gpus, free_port())


def train_records(out: str) -> dict[int, dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "loss" in r}


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root: what run B must leave alone."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(d, name))
            out[os.path.relpath(os.path.join(d, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def dir_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


# ---- configuration ----------------------------------------------------------------------------------------------
def base_overrides(args) -> list[str]:
    """Every launch: the user's overrides, then what the check needs (ours last, so they win)."""
    return [*args.override, "data.synthetic=true", "data.paths=[]", "data.use_demo_corpus=false",
            "data.eval_paths=[]", "train.eval_steps=0", f"parallel.ep_size={args.ep}",
            f"parallel.zero_stage={args.zero_stage}", f"train.max_steps={args.steps}", "train.log_steps=1",
            "train.tensorboard=false", "train.progress_bar=false", "train.profile_steps=[]"]


def model_numbers(args) -> dict:
    """Parameter count and bytes per parameter of the run's config (no memory allocated), for the disk estimate."""
    from framework.config import load_run_config  # noqa: PLC0415
    from framework.config.plan import resolve_model  # noqa: PLC0415
    from framework.tuning.params import param_inventory  # noqa: PLC0415

    cfg = load_run_config(args.config, base_overrides(args))
    params = sum(p.numel for p in param_inventory(resolve_model(cfg)[1]))  # the family's model on the meta device
    dtype_bytes = 4 if cfg.model.dtype == "fp32" else 2  # auto resolves to bf16 on GPUs
    import torch  # noqa: PLC0415

    if cfg.model.dtype == "auto" and not torch.cuda.is_available():
        dtype_bytes = 4
    ckpt = params * (12 + (dtype_bytes if args.zero_stage < 3 else 0))  # fp32 master + Adam m, v (+ module copy)
    export = params * dtype_bytes
    if args.memory_only:
        need = 0.0
    elif args.cleanup:  # run A leaves 2 checkpoints + 1 export; step N goes after run B, then 2 more exports come
        need = 1.05 * max(2 * ckpt + export, ckpt + 3 * export)
    else:
        need = 1.05 * (2 * ckpt + 3 * export)
    return {"params": params, "ckpt_bytes": ckpt, "export_bytes": export, "disk_need": need,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.seq_len}


def check_disk(args, numbers: dict) -> None:
    need = numbers["disk_need"]
    free = shutil.disk_usage(args.out).free
    print(f"model: {count(numbers['params'])} parameters; disk: ~{size(need)} needed under {args.out} (checkpoint "
          f"~{size(numbers['ckpt_bytes'])} x 2, HF copy ~{size(numbers['export_bytes'])} x 3"
          f"{', deleted as they are checked' if args.cleanup else ''}), {size(free)} free", flush=True)
    if need > free and not args.skip_disk_check:
        die(f"{args.out} has {size(free)} free, the checks need ~{size(need)}: "
                         "choose a larger filesystem for --out, reduce the depth (--override model.num_layers=8), run "
                         "--memory_only, or pass --skip_disk_check")


# ---- the phases -------------------------------------------------------------------------------------------------
def fresh(args, path: str, what: str) -> None:
    """A phase starts in an empty directory: one left unfinished by an earlier call goes with --reuse."""
    if not os.path.exists(path):
        return
    if not args.reuse:
        die(f"{path} exists from an earlier call: add --reuse to continue it, or choose a new --out")
    print(f"{what}: {path} is unfinished; starting it again", flush=True)
    shutil.rmtree(path)


def run_a(args, a: str) -> None:
    records = train_records(a)
    final = os.path.join(a, "checkpoints", f"step_{args.steps:08d}")
    if args.memory_only:
        done = args.steps in records
    else:
        done = (args.steps in records and os.path.isdir(final)
                and os.path.exists(os.path.join(a, "hf", "model.safetensors.index.json")))
    if done and args.reuse:
        print(f"run A: reusing {a}", flush=True)
        return
    fresh(args, a, "run A")
    if args.memory_only:
        saves = ["train.save_steps=0", "train.save_at_end=false", "export.at_end=false"]
    else:
        saves = [f"train.save_steps={args.save_at}", "train.save_at_end=true", f"train.keep_last={args.steps + 1}",
                 "export.at_end=true", "export.format=hf"]
    cmd = launcher(args.num_gpus) + [PRETRAIN, "--config", args.config]
    cmd += (["--deepspeed", args.deepspeed] if args.deepspeed else []) + base_overrides(args) + saves
    run_logged(cmd + [f"train.output_dir={a}"], os.path.join(args.out, "a.log"), args.timeout)


def run_b(args, a: str, b: str) -> None:
    if args.steps in train_records(b) and args.reuse:
        print(f"run B: reusing {b}", flush=True)
        return
    ckpt = os.path.join(a, "checkpoints", f"step_{args.save_at:08d}")
    if not os.path.isdir(ckpt):
        raise Failure(f"run A left no checkpoint {ckpt}")
    fresh(args, b, "run B")
    cmd = launcher(args.num_gpus) + [PRETRAIN, "--config", args.config]
    cmd += (["--deepspeed", args.deepspeed] if args.deepspeed else []) + base_overrides(args)
    cmd += ["train.save_steps=0", "train.save_at_end=false", "export.at_end=false", f"train.output_dir={b}",
            "--resume", ckpt]
    before = snapshot(a)
    run_logged(cmd, os.path.join(args.out, "b.log"), args.timeout)
    if snapshot(a) != before:
        raise Failure(f"run B changed files under {a}")
    with open(os.path.join(args.out, "b.log")) as f:
        if f"resumed from {ckpt} at step {args.save_at}" not in f.read():
            raise Failure(f"run B did not say 'resumed from {ckpt} at step {args.save_at}' (see b.log)")


def compare_losses(args, a: str, b: str) -> dict:
    ra, rb = train_records(a), train_records(b)
    steps = list(range(args.save_at + 1, args.steps + 1))
    result = {"steps": steps, "max_rel": {}, "mismatches": [], "first_mismatch": None}
    missing = [s for s in steps if s not in ra or s not in rb]
    if missing or sorted(rb) != steps:
        result["first_mismatch"] = f"steps logged: run A {sorted(ra)}, run B {sorted(rb)} (expected {steps} in B)"
        result["max_rel"] = {k: float("inf") for k in COMPARED}
        result["ok"] = False
        return result
    for key in COMPARED:
        worst = 0.0
        for s in steps:
            x, y = ra[s].get(key), rb[s].get(key)
            if x is None or y is None:
                rel = 0.0 if x is None and y is None else float("inf")
            else:
                rel = 0.0 if x == y else abs(x - y) / max(abs(x), 1e-30)
            worst = max(worst, rel)
            if rel > args.tolerance:
                result["mismatches"].append((s, key, x, y, rel))
        result["max_rel"][key] = worst
    if result["mismatches"]:
        s, key, x, y, rel = result["mismatches"][0]
        result["first_mismatch"] = f"step {s} {key}: run A {x!r}, run B {y!r} (rel {rel:.3g})"
    result["ok"] = not result["mismatches"]
    return result


def convert(args, a: str) -> tuple[str, str]:
    merged, live = os.path.join(a, "hf_merged"), os.path.join(a, "ckpt_merged")
    # both tools write OUT.tmp-<pid> and rename at the end: an existing output is complete
    if not (args.reuse and os.path.isdir(live)):
        run_logged([sys.executable, os.path.join(REPO, "tools", "ds_to_hf.py"), "--checkpoint",
                    os.path.join(a, "checkpoints"), "--tag", f"step_{args.steps:08d}", "--format", "merged",
                    "--output", live], os.path.join(args.out, "ds_to_hf.log"), args.timeout)
    if not (args.reuse and os.path.isdir(merged)):
        run_logged([sys.executable, os.path.join(REPO, "tools", "moe_merge.py"), "--raw_hf_path",
                    os.path.join(a, "hf"), "--merge_hf_path", merged], os.path.join(args.out, "moe_merge.log"),
                   args.timeout)
    return merged, live


def safetensors_index(path: str) -> dict[str, str]:
    """tensor name -> shard file of an HF directory."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    out[key] = os.path.join(path, name)
    return out


def compare_tensors(merged: str, live: str) -> dict:
    """Tensor for tensor, one tensor of each side in memory at a time."""
    import torch  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    ia, ib = safetensors_index(merged), safetensors_index(live)
    only_a, only_b = sorted(set(ia) - set(ib)), sorted(set(ib) - set(ia))
    result = {"n": len(ib), "compared": 0, "equal": 0, "only_export": only_a, "only_checkpoint": only_b,
              "first_mismatch": None}
    if only_a or only_b:
        result["first_mismatch"] = (f"key sets differ: {len(only_a)} only in the export ({only_a[:3]}), "
                                    f"{len(only_b)} only in the checkpoint ({only_b[:3]})")
    handles = {}

    def tensor(files: dict[str, str], key: str) -> torch.Tensor:
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt").__enter__()
        return handles[path].get_tensor(key)

    for key in sorted(set(ia) & set(ib)):
        x, y = tensor(ia, key), tensor(ib, key)
        result["compared"] += 1
        if x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y):
            result["equal"] += 1
        elif result["first_mismatch"] is None:
            detail = (f"dtype {x.dtype} vs {y.dtype}" if x.dtype != y.dtype else
                      f"shape {tuple(x.shape)} vs {tuple(y.shape)}" if x.shape != y.shape else
                      f"max abs diff {(x.double() - y.double()).abs().max().item():.3g}")
            result["first_mismatch"] = f"{key}: {detail} (export vs checkpoint)"
    for h in handles.values():
        h.__exit__(None, None, None)
    result["ok"] = not only_a and not only_b and result["equal"] == result["compared"] == result["n"] > 0
    return result


def estimate(args, numbers: dict) -> float | None:
    log = os.path.join(args.out, "estimate.log")
    cmd = [sys.executable, os.path.join(REPO, "tools", "tune_zero.py"), "estimate", "--config", args.config,
           "--num_gpus", str(args.num_gpus), "--ep_size", str(args.ep), "--zero_stage", str(args.zero_stage),
           "--micro_batch_size", str(numbers["micro_batch_size"])]
    cmd += (["--deepspeed", args.deepspeed] if args.deepspeed else []) + base_overrides(args)
    run_logged(cmd, log, args.timeout)
    with open(log) as f:
        text = f.read()
    m = re.search(r"^peak ([0-9.]+) GiB per GPU", text, re.M)
    return float(m[1]) if m else None


def throughput(args, records: dict[int, dict]) -> tuple[float | None, float | None]:
    """Medians over steps 2..steps without the step after the save (its window includes the save)."""
    timed = [r for s, r in records.items() if s > 1 and s != args.save_at + 1] or list(records.values())
    if not timed:
        return None, None
    return (statistics.median(r["tokens_per_s_per_gpu"] for r in timed),
            statistics.median(r["tflops_per_gpu"] for r in timed))


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="run YAML (default: Qwen3-30B-A3B, 48 layers)")
    p.add_argument("--num_gpus", type=int, default=8, help="processes (GPUs; CPU processes with gloo without CUDA)")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size")
    p.add_argument("--zero_stage", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of run A (and of run B, counted from 1)")
    p.add_argument("--save_at", type=int, default=3, help="run A saves here; run B resumes from it")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "full_model"), help="every artefact goes here")
    p.add_argument("--override", action="append", default=[], help="section.key=value for every launch (repeat)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON for every launch and the estimate")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="max relative loss / grad-norm difference of the resumed steps (0 = exact, right on CPU; "
                        "GPUs need e.g. 1e-3: flash-attention backward and NCCL reductions are not bit-reproducible)")
    p.add_argument("--memory_only", action="store_true",
                   help="run A only, without checkpoints or export: memory vs estimate and throughput")
    p.add_argument("--cleanup", action="store_true",
                   help="delete checkpoints and HF copies as soon as they are checked (less disk at the peak)")
    p.add_argument("--reuse", action="store_true", help="reuse the phases an earlier call finished in --out")
    p.add_argument("--skip_disk_check", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each launch (default: none)")
    args = p.parse_args(argv)
    if not 1 <= args.save_at < args.steps:
        p.error(f"--save_at must be in 1..steps-1 (got {args.save_at}, steps {args.steps})")
    args.out = os.path.abspath(args.out)
    args.config = os.path.abspath(args.config)
    os.makedirs(args.out, exist_ok=True)
    a, b = os.path.join(args.out, "a"), os.path.join(args.out, "b")

    import torch  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    device = f"{args.num_gpus}x {torch.cuda.get_device_name(0)}" if cuda else f"{args.num_gpus} CPU processes (gloo)"
    numbers = model_numbers(args)
    print(f"{device}; {os.path.relpath(args.config, REPO)}, EP={args.ep}, ZeRO-{args.zero_stage}, steps {args.steps}, "
          f"save at {args.save_at}; overrides: {' '.join(args.override) or '-'}", flush=True)
    check_disk(args, numbers)
    start = time.time()
    summary: dict = {"args": vars(args), "device": device, "params": numbers["params"]}
    failures: list[str] = []

    def attempt(phase, *phase_args):
        """Run one phase; a failure is recorded (first line) and the independent phases still run."""
        try:
            return phase(*phase_args)
        except Failure as e:
            print(f"FAILED: {e}", file=sys.stderr, flush=True)
            failures.append(str(e).splitlines()[0])
            return None

    def check_run_a() -> bool:
        run_a(args, a)
        if sorted(train_records(a)) != list(range(1, args.steps + 1)):
            raise Failure(f"run A logged steps {sorted(train_records(a))}, expected 1..{args.steps}")
        return True

    def check_resume() -> dict:
        run_b(args, a, b)
        return compare_losses(args, a, b)

    def check_export() -> dict:
        return compare_tensors(*convert(args, a))

    saved = os.path.join(a, "checkpoints", f"step_{args.save_at:08d}")
    if attempt(check_run_a) and not args.memory_only:
        if os.path.isdir(saved):
            summary["checkpoint_bytes"] = dir_bytes(saved)
        if (losses := attempt(check_resume)) is not None:
            summary["resume"] = losses
            if args.cleanup:
                shutil.rmtree(saved)
        if (tensors := attempt(check_export)) is not None:
            summary["export"] = tensors
            if args.cleanup and tensors["ok"]:
                for d in ("hf_merged", "ckpt_merged", "hf", os.path.join("checkpoints", f"step_{args.steps:08d}")):
                    shutil.rmtree(os.path.join(a, d), ignore_errors=True)
    est = attempt(estimate, args, numbers)
    ra = train_records(a)
    measured = max((r["mem_gb"] for r in ra.values()), default=None)
    before_save = max((r["mem_gb"] for s, r in ra.items() if s <= args.save_at), default=None)
    tokens, tflops = throughput(args, ra)
    summary.update({"memory_measured_gb": measured, "memory_measured_before_save_gb": before_save,
                    "memory_estimate_gib": est, "tokens_per_s_per_gpu": tokens,
                    "tflops_per_gpu": tflops, "seconds": round(time.time() - start, 1)})

    # ---- the table ----
    rows = []
    if "resume" in summary:
        r = summary["resume"]
        worst = max(r["max_rel"].values())
        state = "equal" if r["ok"] else "DIFFER"
        rows.append(("resume losses (steps %d-%d)" % (args.save_at + 1, args.steps),
                     f"{state}: max rel diff {worst:.3g} (tolerance {args.tolerance:g}); "
                     + ", ".join(f"{k} {v:.2g}" for k, v in r["max_rel"].items()), r["ok"]))
        if not r["ok"]:
            failures.append(f"resume: {r['first_mismatch']}")
    elif not args.memory_only:
        rows.append(("resume losses", "not run", False))
    if "export" in summary:
        t = summary["export"]
        state = "equal" if t["ok"] else "DIFFER"
        rows.append(("export tensors (moe_merge vs ds_to_hf)",
                     f"{state}: {t['equal']}/{t['n']} equal" + (f"; first mismatch {t['first_mismatch']}"
                                                                 if t["first_mismatch"] else ""), t["ok"]))
        if not t["ok"]:
            failures.append(f"export: {t['first_mismatch']}")
    elif not args.memory_only:
        rows.append(("export tensors", "not run", False))
    if "checkpoint_bytes" in summary:
        rows.append(("checkpoint size (one step)", f"{size(summary['checkpoint_bytes'])} measured, "
                     f"~{size(numbers['ckpt_bytes'])} expected (12 bytes a parameter, 14 with ZeRO-1/2)", None))
    if measured is not None:
        kind = "GiB (max_memory_allocated)" if cuda else "GiB (CPU: peak RSS, not comparable)"
        ratio = f", measured/estimate {measured / est:.3f}" if est else ""
        early = "" if args.memory_only else f" ({before_save:.2f} in steps 1-{args.save_at}, before any save)"
        rows.append(("peak memory per GPU", f"{measured:.2f} measured{early} vs "
                     f"{'-' if est is None else f'{est:.1f}'} estimate {kind}{ratio}", None))
    if tokens is not None:
        rows.append(("run A tokens/s/GPU, TFLOP/s/GPU", f"{tokens:,.0f}, {tflops:.1f} (median)", None))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"\nissue #8 checks: {device}, {count(numbers['params'])} parameters, EP={args.ep}, "
          f"ZeRO-{args.zero_stage}, {summary['seconds']:.0f} s")
    width = max(len(r[0]) for r in rows) if rows else 10
    for name, value, ok in rows:
        mark = "" if ok is None else ("PASS  " if ok else "FAIL  ")
        print(f"  {name:<{width}}  {mark}{value}")
    for failure in failures:
        print(f"  FAILED: {failure}")
    print("RESULT " + ("FAIL" if failures else "PASS"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
