"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 section 2.1.2): after each optimizer step every
MoE layer's selection bias moves towards balance, bias_e += rate * sign(mean_load - load_e), where load_e is the number
of tokens the layer sent to expert e over the whole global batch (every micro-batch of the step, every rank).

Owns: counting the per-layer expert load across a step's micro-batches (no host sync) and the update. The counts are
all-reduced over the default process group before the update, so every rank computes the same bias from the same
load (a rank's own tokens differ by data parallelism; under expert parallelism every rank routes its own tokens to
all E experts). Does not own the bias (the router's `e_score_correction_bias` buffer, framework/moe/router.py) or
when the step happens (framework/train/trainer.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from framework.moe.aux_loss import RouterStats

BIAS_NAME = "e_score_correction_bias"


def selection_biases(model: nn.Module) -> list[torch.Tensor]:
    """The selection-bias buffers of the model's MoE routers, in layer order (the order of its router statistics)."""
    from framework.moe.layer import MoEBlock  # noqa: PLC0415

    return [getattr(m.gate, BIAS_NAME) for m in model.modules()
            if isinstance(m, MoEBlock) and hasattr(m.gate, BIAS_NAME)]


def bias_update(load_LE: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias step for each layer's expert load [L, E]: rate * sign(mean load - load) (0 for an expert at the mean)."""
    return rate * torch.sign(load_LE.mean(dim=-1, keepdim=True) - load_LE)


class RouterBiasBalancer:
    """Accumulates each micro-batch's router statistics; `step()` after the optimizer step updates every bias."""

    def __init__(self, model: nn.Module, rate: float):
        if rate <= 0:
            raise ValueError(f"router bias update rate {rate} must be > 0")
        self.biases = selection_biases(model)
        if not self.biases:
            raise ValueError("router_bias_update_rate: the model's routers have no selection bias "
                             f"({BIAS_NAME}); only deepseek_v3-style routers do")
        self.rate = rate
        self.load_LE: torch.Tensor | None = None

    def accumulate(self, stats: list[RouterStats]) -> None:
        """Add one micro-batch's per-layer token counts (padding excluded)."""
        if len(stats) != len(self.biases):
            raise RuntimeError(f"{len(stats)} router statistics for {len(self.biases)} biased routers")
        load = torch.stack([s.tokens_per_expert.detach().float() for s in stats])
        self.load_LE = load if self.load_LE is None else self.load_LE + load

    @torch.no_grad()
    def step(self) -> None:
        """Update the biases from the load counted since the last step (all-reduced over every rank), then reset.
        Collective when torch.distributed is initialised: every rank calls it after the same optimizer step."""
        if self.load_LE is None:
            return
        load = self.load_LE
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        delta = bias_update(load, self.rate)
        for bias, d in zip(self.biases, delta):
            bias.add_(d.to(bias.device))
        self.load_LE = None
