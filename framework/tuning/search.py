"""Measured search over ZeRO / EP / batch settings: short real training runs through launch/pretrain.py.

Owns: the trial grid, launching each trial with DeepSpeed's runner exactly as a user would, reading its
metrics.jsonl, the results CSV (appended one row per finished trial, so an interrupted search resumes where it
stopped), and the best configuration (a DeepSpeed JSON + the YAML overrides it needs). Whether a trial fits in memory
is asked of a `fits` callable (the estimator) before spending GPU time on it.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from framework.checkpoint.atomic_dir import write_text_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ["trial", "status", "tokens_per_s_per_gpu", "tflops_per_gpu", "mem_gb", "estimate_gb", "seconds",
          "micro_batch_size", "zero_stage", "ep_size", "bucket_scale", "activation_checkpointing", "offload", "note",
          "ep_chunks"]  # appended last: a results file from before it keeps its columns where they were


@dataclass(frozen=True)
class Trial:
    micro_batch_size: int
    zero_stage: int
    ep_size: int
    bucket_scale: float
    activation_checkpointing: bool | str  # True, "moe", "attention" or False
    offload: bool
    ep_chunks: int = 1  # parallel.ep_chunks

    @property
    def name(self) -> str:
        # no suffix for 1 chunk: the names (and so the resumable results) of searches from before ep_chunks hold
        return (f"mbs{self.micro_batch_size}-z{self.zero_stage}-ep{self.ep_size}-b{self.bucket_scale:g}"
                f"-ac{self._ac}-off{int(self.offload)}" + (f"-c{self.ep_chunks}" if self.ep_chunks > 1 else ""))

    @property
    def _ac(self) -> str:
        ac = self.activation_checkpointing
        return str(int(ac)) if isinstance(ac, bool) else ac

    def overrides(self) -> list[str]:
        return [f"train.micro_batch_size={self.micro_batch_size}", f"parallel.zero_stage={self.zero_stage}",
                f"parallel.ep_size={self.ep_size}",
                f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
                f"parallel.ep_chunks={self.ep_chunks}"]


def grid(micro_batch_sizes: list[int], zero_stages: list[int], ep_sizes: list[int], bucket_scales: list[float],
         activation_checkpointing: list[bool | str], offload: list[bool], ep_chunks: list[int] = (1,)) -> list[Trial]:
    """Every combination, less those that change nothing: offload without ZeRO, token chunks without EP."""
    trials = [Trial(*combo) for combo in itertools.product(micro_batch_sizes, zero_stages, ep_sizes, bucket_scales,
                                                           activation_checkpointing, offload, ep_chunks)]
    return [t for t in trials if not (t.offload and t.zero_stage == 0) and not (t.ep_chunks > 1 and t.ep_size == 1)]


def trial_ds_config(trial: Trial, bucket: int, persistence: int) -> dict:
    """The DeepSpeed JSON of one trial: buckets = `bucket_scale` x the auto size (one layer's local experts)."""
    size = max(int(bucket * trial.bucket_scale), 1)
    zero: dict = {"stage": trial.zero_stage}
    if trial.zero_stage == 3:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=size,
                    stage3_prefetch_bucket_size=size, stage3_param_persistence_threshold=persistence,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9)
    elif trial.zero_stage in (1, 2):
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True, reduce_bucket_size=size,
                    allgather_bucket_size=size)
    if trial.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero}


def read_results(path: str) -> dict[str, dict]:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {row["trial"]: row for row in csv.DictReader(f)}


def append_result(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def measure(metrics_path: str, warmup: int) -> dict:
    """Median throughput over the steps after `warmup`; peak memory over all steps."""
    with open(metrics_path) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    if len(steps) <= warmup:
        raise RuntimeError(f"{metrics_path}: {len(steps)} steps logged, need more than {warmup}")
    timed = steps[warmup:]
    return {"tokens_per_s_per_gpu": round(statistics.median(s["tokens_per_s_per_gpu"] for s in timed), 1),
            "tflops_per_gpu": round(statistics.median(s["tflops_per_gpu"] for s in timed), 2),
            "mem_gb": max(s["mem_gb"] for s in steps)}


def run_search(config: str, out_dir: str, trials: list[Trial], launcher: list[str], base_overrides: list[str],
               steps: int, warmup: int, auto: Callable[[int], tuple[int, int]],
               fits: Callable[[Trial], tuple[bool, float | None, str]], timeout: float = 1800) -> dict | None:
    """Run every trial not yet in OUT_DIR/trials.csv; return the best row (highest tokens/s/GPU) of all recorded.

    `launcher`: the runner command up to the script (e.g. [python, -m, deepspeed.launcher.runner, --num_gpus, 4]).
    `auto(ep_size)`: (bucket, persistence) auto sizes. `fits(trial)`: (fits, estimated GiB, why not)."""
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "trials.csv")
    done = read_results(results_path)
    for trial in trials:
        if trial.name in done:
            print(f"{trial.name}: recorded already ({done[trial.name]['status']})", flush=True)
            continue
        row = {"trial": trial.name, **asdict(trial)}
        ok, estimate, why = fits(trial)
        row["estimate_gb"] = "" if estimate is None else round(estimate, 1)
        if not ok:
            row.update(status="skipped", note=why)
            append_result(results_path, row)
            print(f"{trial.name}: skipped ({why})", flush=True)
            continue
        trial_dir = os.path.join(out_dir, "trials", trial.name)
        os.makedirs(trial_dir, exist_ok=True)
        ds_path = os.path.join(trial_dir, "trial_ds_config.json")
        with open(ds_path, "w") as f:
            json.dump(trial_ds_config(trial, *auto(trial.ep_size)), f, indent=2)
        run_dir = os.path.join(trial_dir, "run")
        cmd = launcher + [os.path.join(REPO, "launch", "pretrain.py"), "--config", config, "--deepspeed", ds_path,
                          *base_overrides, *trial.overrides(), f"train.max_steps={steps}", "train.log_steps=1",
                          "train.save_steps=0", "train.save_at_end=false", "export.at_end=false",
                          "train.progress_bar=false", "train.tensorboard=false", f"train.output_dir={run_dir}"]
        start = time.time()
        with open(os.path.join(trial_dir, "log.txt"), "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        row["seconds"] = round(time.time() - start, 1)
        if rc == 0:
            try:
                row.update(status="ok", **measure(os.path.join(run_dir, "metrics.jsonl"), warmup))
            except (OSError, RuntimeError) as e:
                row.update(status="failed", note=str(e))
        else:
            with open(os.path.join(trial_dir, "log.txt")) as f:
                tail = f.read()[-2000:]
            oom = "out of memory" in tail.lower()
            row.update(status="oom" if oom else "failed", note=f"rc={rc}; see {os.path.join(trial_dir, 'log.txt')}")
        append_result(results_path, row)
        print(f"{trial.name}: {row['status']} {row.get('tokens_per_s_per_gpu', '')} tok/s/GPU "
              f"{row.get('mem_gb', '')} GB ({row['seconds']} s)", flush=True)
    rows = [r for r in read_results(results_path).values() if r["status"] == "ok"]
    if not rows:
        return None
    best = max(rows, key=lambda r: float(r["tokens_per_s_per_gpu"]))
    best_dir = os.path.join(out_dir, "trials", best["trial"])
    with open(os.path.join(best_dir, "run", "ds_config.json")) as f:
        resolved = json.load(f)
    for key in ("optimizer", "bf16", "train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping"):
        resolved.pop(key, None)  # the YAML owns these (see framework/config/deepspeed.py)
    write_text_atomic(os.path.join(out_dir, "best_ds_config.json"), json.dumps(resolved, indent=2))
    trial = next(t for t in trials if t.name == best["trial"]) if any(t.name == best["trial"] for t in trials) else None
    overrides = trial.overrides() if trial else []
    with open(os.path.join(out_dir, "best_overrides.txt"), "w") as f:
        f.write(" ".join(overrides) + "\n")
    return best


def python_launcher(num_gpus: int | None, hostfile: str | None, master_port: int) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    return cmd
