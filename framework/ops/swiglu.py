"""SwiGLU on fused gate/up rows, scaled per row: silu(gate) * up * weight, with gate the first I columns of [R, 2I]
and up the last I.

The row weight is the routing weight of the (token, expert) slot the row belongs to. Applied here, before the
experts' second GEMM (which is linear, so the result is the same), it lets the combine be a plain sum that keeps
nothing for its backward; the weight's gradient is a dot over the row's I columns, which this backward reads anyway
(benchmarks/PERF_NOTES.md, change 29). One kernel each way on CUDA (framework/ops/triton_kernels.py) instead of eager
torch's chunk -> silu -> multiply, whose backward adds elementwise passes and a [R, 2I] concatenation. Saves only the
[R, 2I] input and the [R] weights for the backward. The torch formulas below are the CPU path and the kernels'
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.ops.triton_available import use_triton


def swiglu_reference(gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None = None) -> torch.Tensor:
    compute = torch.promote_types(gate_up_R2I.dtype, torch.float32)
    gate, up = gate_up_R2I.to(compute).chunk(2, dim=-1)
    out = F.silu(gate) * up
    if weight_R is not None:
        out = out * weight_R.to(compute).unsqueeze(-1)
    return out.to(gate_up_R2I.dtype)


def _swiglu_backward_torch(gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None, grad_RI: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    compute = torch.promote_types(gate_up_R2I.dtype, torch.float32)
    gate, up = gate_up_R2I.to(compute).chunk(2, dim=-1)
    grad = grad_RI.to(compute)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_weight = None
    if weight_R is not None:
        grad_weight = (grad * silu * up).sum(-1).to(weight_R.dtype)
        grad = grad * weight_R.to(compute).unsqueeze(-1)
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    grad_up = grad * silu
    return torch.cat([grad_gate, grad_up], dim=-1).to(gate_up_R2I.dtype), grad_weight


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None) -> torch.Tensor:
        gate_up_R2I = gate_up_R2I.contiguous()
        weight_R = None if weight_R is None else weight_R.contiguous()
        ctx.save_for_backward(gate_up_R2I, weight_R)
        if use_triton(gate_up_R2I):
            from framework.ops.triton_kernels import swiglu_forward  # noqa: PLC0415
            return swiglu_forward(gate_up_R2I, weight_R)
        return swiglu_reference(gate_up_R2I, weight_R)

    @staticmethod
    def backward(ctx, grad_RI: torch.Tensor):
        gate_up_R2I, weight_R = ctx.saved_tensors
        grad_RI = grad_RI.contiguous()
        if use_triton(gate_up_R2I):
            from framework.ops.triton_kernels import swiglu_backward  # noqa: PLC0415
            return swiglu_backward(gate_up_R2I, weight_R, grad_RI)
        return _swiglu_backward_torch(gate_up_R2I, weight_R, grad_RI)


def swiglu(gate_up_R2I: torch.Tensor, weight_R: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] * weight[:, None] -> [R, I] (no weight: unscaled), computed in fp32 and
    rounded once. Gradients flow to gate_up and weight."""
    return _SwiGLU.apply(gate_up_R2I, weight_R)


def glu(gate_up_R2I: torch.Tensor, act: nn.Module, weight_R: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate) * up * weight: SiLU (every Qwen3-MoE) takes the fused op, any other activation the eager formula."""
    if isinstance(act, nn.SiLU):
        return swiglu(gate_up_R2I, weight_R)
    gate, up = gate_up_R2I.chunk(2, dim=-1)
    out = act(gate) * up
    return out if weight_R is None else out * weight_R.unsqueeze(-1).to(out.dtype)
