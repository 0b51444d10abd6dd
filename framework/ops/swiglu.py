"""SwiGLU on fused gate/up rows: silu(gate) * up, with gate the first I columns of [R, 2I] and up the last I.

One kernel each way on CUDA (framework/ops/triton_kernels.py) instead of eager torch's chunk -> silu -> multiply,
whose backward adds three more elementwise passes and a [R, 2I] concatenation. Saves only the [R, 2I] input for the
backward (eager keeps silu(gate) as well). The torch formulas below are the CPU path and the kernels' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.ops.triton_available import use_triton


def swiglu_reference(gate_up_R2I: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_R2I.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward_torch(gate_up_R2I: torch.Tensor, grad_RI: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(gate_up_R2I.dtype, torch.float32)
    gate, up = gate_up_R2I.to(compute).chunk(2, dim=-1)
    grad = grad_RI.to(compute)
    sig = torch.sigmoid(gate)
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    grad_up = grad * gate * sig
    return torch.cat([grad_gate, grad_up], dim=-1).to(gate_up_R2I.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_R2I: torch.Tensor) -> torch.Tensor:
        gate_up_R2I = gate_up_R2I.contiguous()
        ctx.save_for_backward(gate_up_R2I)
        if use_triton(gate_up_R2I):
            from framework.ops.triton_kernels import swiglu_forward  # noqa: PLC0415
            return swiglu_forward(gate_up_R2I)
        return swiglu_reference(gate_up_R2I)

    @staticmethod
    def backward(ctx, grad_RI: torch.Tensor) -> torch.Tensor:
        (gate_up_R2I,) = ctx.saved_tensors
        grad_RI = grad_RI.contiguous()
        if use_triton(gate_up_R2I):
            from framework.ops.triton_kernels import swiglu_backward  # noqa: PLC0415
            return swiglu_backward(gate_up_R2I, grad_RI)
        return _swiglu_backward_torch(gate_up_R2I, grad_RI)


def swiglu(gate_up_R2I: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] -> [R, I]."""
    return _SwiGLU.apply(gate_up_R2I)


def glu(gate_up_R2I: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """act(gate) * up: SiLU (every Qwen3-MoE) takes the fused op, any other activation the eager formula."""
    if isinstance(act, nn.SiLU):
        return swiglu(gate_up_R2I)
    gate, up = gate_up_R2I.chunk(2, dim=-1)
    return act(gate) * up
