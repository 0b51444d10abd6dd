"""Training metrics: what is measured each logging window and where it goes (metrics.jsonl, TensorBoard, stdout).

Owns: accumulating per-step values on the device without host syncs (one sync per logging window), reducing them over
ranks, expert load per MoE layer, and writing. Only rank 0 writes; every rank must call `window_record` (it reduces).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from framework.checkpoint.atomic_dir import write_text_atomic
from framework.moe.aux_loss import RouterStats


class WindowMeter:
    """Sums over the micro batches of one logging window; `window_record` reduces over ranks and resets."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.lm_loss = torch.zeros((), device=self.device)
        self.aux_loss = torch.zeros((), device=self.device)
        self.micro_batches = 0
        self.steps = 0
        self.tokens = 0
        self.expert_counts: torch.Tensor | None = None  # [moe layers, E], summed over the window's micro batches
        self.start = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, lm_loss: torch.Tensor, aux_loss: torch.Tensor | None,
                        router_stats: list[RouterStats], tokens: int) -> None:
        self.loss += loss.detach().float()
        self.lm_loss += lm_loss.detach().float()
        if aux_loss is not None:
            self.aux_loss += aux_loss.detach().float()
        if router_stats:
            counts = torch.stack([s.tokens_per_expert.detach() for s in router_stats])
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        self.micro_batches += 1
        self.tokens += tokens

    def window_record(self, world_size: int) -> dict[str, Any]:
        """Means over the window and over ranks (collective). Expert load: tokens routed to each expert per optimizer
        step, summed over ranks: the max and mean over experts, per MoE layer."""
        scalars = torch.stack([self.loss, self.lm_loss, self.aux_loss]) / max(1, self.micro_batches)
        if world_size > 1:
            dist.all_reduce(scalars)
            scalars /= world_size
            if self.expert_counts is not None:
                dist.all_reduce(self.expert_counts)
        loss, lm_loss, aux_loss = scalars.tolist()
        record: dict[str, Any] = {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss}
        if self.expert_counts is not None:
            per_step = self.expert_counts / max(1, self.steps)
            record["expert_load_max"] = [round(x, 2) for x in per_step.max(dim=1).values.tolist()]
            record["expert_load_mean"] = [round(x, 2) for x in per_step.mean(dim=1).tolist()]
            ratios = [m / n for m, n in zip(record["expert_load_max"], record["expert_load_mean"]) if n > 0]
            record["expert_load_max_over_mean"] = round(max(ratios), 3) if ratios else None
        record["elapsed_s"] = time.perf_counter() - self.start
        return record


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory since start (CUDA), else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class MetricsWriter:
    """metrics.jsonl (one JSON object per line, appended and flushed as it goes) and TensorBoard event files."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            _truncate_after(self.path, resume_step)  # the steps after the checkpoint will be logged again
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - imports tensorboard, slow

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            for key in ("expert_load_max", "expert_load_mean"):
                for layer, value in enumerate(record.get(key) or []):
                    self._tb.add_scalar(f"{key}/moe_layer_{layer}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep the lines of steps <= `step` (and drop a torn last line), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    write_text_atomic(path, "".join(kept))
