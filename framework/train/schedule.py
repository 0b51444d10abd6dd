"""Learning-rate schedules: linear warmup, then cosine / linear decay to `min_lr_ratio`, or constant."""

from __future__ import annotations

import math


class LRSchedule:
    """Multiplier of the peak lr at optimizer step `step` (0-based), for torch's LambdaLR. A plain object rather than a
    closure so LambdaLR.state_dict() saves it with the checkpoint."""

    def __init__(self, kind: str, max_steps: int, warmup_steps: int, min_lr_ratio: float):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_schedule {kind!r}: expected cosine, linear or constant")
        self.kind, self.max_steps, self.warmup_steps, self.min_lr_ratio = kind, max_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.max_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
