"""torch.profiler over a window of optimizer steps (`train.profile_steps: [first, last]`).

Owns: when the profiler runs and what it leaves in OUTPUT_DIR/profile, on every rank R (EP ranks route different
tokens, so their kernels differ):
  rankR.trace.json.gz  chrome trace (chrome://tracing, https://ui.perfetto.dev)
  rankR_ops.txt        a header line (steps, wall seconds per step) and key_averages' table, top 40
  rankR_kernels.json   the top 60 entries by self device time (self CPU time without CUDA) as
                       {name, calls, device_time_ms, cpu_time_ms}; times are self times per profiled step, calls the
                       total over the window. For benchmarks to read. Rows overlap: an op such as aten::mm counts the
                       kernels it launches as its own device time, and those kernels have rows too; do not sum them.
Whatever runs between two of the window's steps (logging, a save or an evaluation that falls inside it) is in the
trace and the tables too; the wall seconds per step are timed inside the steps only. The trainer imports this module
only when the window is set.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from framework.checkpoint.atomic_dir import write_text_atomic


class StepProfiler:
    def __init__(self, steps: list[int], output_dir: str, rank: int, device: torch.device):
        self.first, self.last = steps
        self.dir = os.path.join(output_dir, "profile")
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.prof = None
        self.from_step, self.t0 = self.first, 0.0
        self.steps_done = 0
        self.wall_s = 0.0  # inside the steps only: logging, evaluation and saves between them are not step time
        self.done = False

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # kernels still queued belong to the step that launched them

    def step_begin(self, step: int) -> None:
        """Before optimizer step `step` (1-based) starts. A resumed run inside the window profiles what is left."""
        if self.done or not self.first <= step <= self.last:
            return
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
            with warnings.catch_warnings():  # torch 2.11 warns of multi-cycle schedules; one window has one cycle
                warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
                self.prof.start()
            self.from_step = step
        self._sync()
        self.t0 = time.perf_counter()

    def step_end(self, step: int) -> str | None:
        """After optimizer step `step` ends; returns the directory once the window's files are written."""
        if self.prof is None or self.done:
            return None
        self._sync()
        self.wall_s += time.perf_counter() - self.t0
        self.steps_done += 1
        if step < self.last:
            return None
        self.prof.stop()
        self.done = True
        self._write(step)
        return self.dir

    def _write(self, to_step: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        stem = os.path.join(self.dir, f"rank{self.rank}")
        # a reader (or a crash) must never see half a file: write under a temporary name, then rename
        tmp = f"{stem}.trace.json.tmp-{os.getpid()}"
        self.prof.export_chrome_trace(tmp)
        with open(tmp, "rb") as src, gzip.open(tmp + ".gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)  # level 1: real-model traces are hundreds of MB; JSON still shrinks ~10x
        os.replace(tmp + ".gz", f"{stem}.trace.json.gz")
        os.remove(tmp)

        events = self.prof.key_averages()
        n = self.steps_done
        header = (f"# optimizer steps {self.from_step}-{to_step} profiled ({n} steps), rank {self.rank}: "
                  f"{self.wall_s / n:.4f} s wall per profiled step (profiler overhead included)\n")
        table = events.table(sort_by="cuda_time_total" if self.cuda else "cpu_time_total", row_limit=40)
        write_text_atomic(f"{stem}_ops.txt", header + table + "\n")

        def self_device_us(e) -> float:
            # torch renamed self_cuda_time_total to self_device_time_total; FunctionEventAvg may have only one
            value = getattr(e, "self_device_time_total", None)
            return value if value is not None else e.self_cuda_time_total

        key = self_device_us if self.cuda else (lambda e: e.self_cpu_time_total)
        top = [e for e in sorted(events, key=key, reverse=True) if key(e) > 0][:60]
        rows = [{"name": e.key, "calls": e.count, "device_time_ms": round(self_device_us(e) / 1e3 / n, 5),
                 "cpu_time_ms": round(e.self_cpu_time_total / 1e3 / n, 5)} for e in top]
        write_text_atomic(f"{stem}_kernels.json", json.dumps(rows, indent=1) + "\n")
        self.prof = None  # the trace's events can be hundreds of MB; free them before training goes on

