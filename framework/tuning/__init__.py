"""Tuning a run's ZeRO / expert-parallel settings: the per-GPU memory estimate (estimate.py, activations.py,
params.py, report.py) and the measured search over settings (search.py)."""

from framework.tuning.estimate import MemoryEstimate, Phase, ZeroSettings, estimate_memory
from framework.tuning.report import format_report

__all__ = ["MemoryEstimate", "Phase", "ZeroSettings", "estimate_memory", "format_report"]
