"""One AdamW step in place on a flat fp32 partition, read from a bf16/fp16/fp32 gradient, in one pass over memory.

The ZeRO step otherwise takes three passes per element: the low-precision gradient converted to fp32 (read 2 bytes,
write 4), torch's fused AdamW (reads and writes param, exp_avg, exp_avg_sq, and the unscaled gradient back: 32) and
the fp32 params copied to the low-precision model weights (read 4, write 2): 44 bytes. The step is memory-bound, and
one kernel (framework/ops/triton_kernels.py) reading the gradient once and writing the low-precision copy as it goes
moves 28. The math is torch's fused AdamW's (ADAMW mode, no amsgrad, no maximize), element by element in fp32 and in
the same order, so the two agree to fp32 rounding. The torch formulas below are the CPU path and the kernel's
reference.
"""

from __future__ import annotations

import torch

from framework.ops.triton_available import use_triton

_FP32_ONLY = (torch.float32,)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# Elements per pass of the torch path: its fp32 temporaries (the gradient, denom, the update) stay at 3 x 64 MiB.
_CHUNK = 1 << 24


def _check(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], ref: torch.Tensor | None) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"adamw_step_: {name} must be 1-D and contiguous, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    if t.dtype not in dtypes:
        raise ValueError(f"adamw_step_: {name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if ref is not None and t.numel() != ref.numel():
        raise ValueError(f"adamw_step_: {name} has {t.numel()} elements, param {ref.numel()}")
    if ref is not None and t.device != ref.device:
        raise ValueError(f"adamw_step_: {name} is on {t.device}, param on {ref.device}")


def _adamw_step_torch(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      out: torch.Tensor | None, grad_scale: torch.Tensor | None, lr_wd: float, beta1: float,
                      beta2: float, eps: float, step_size: float, bias_correction2_sqrt: float) -> None:
    for start in range(0, param.numel(), _CHUNK):
        end = start + _CHUNK
        p, m, v = param[start:end], exp_avg[start:end], exp_avg_sq[start:end]
        g = grad[start:end].to(torch.float32)  # may be grad itself: only out-of-place ops on g below
        if grad_scale is not None:
            g = g / grad_scale
        p.sub_(p, alpha=lr_wd)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
        # step_size * m / denom in that order, as the fused kernels (addcdiv would divide first)
        p.sub_(m.mul(step_size).div_(denom))
        if out is not None:
            out[start:end].copy_(p)


@torch.no_grad()  # an optimizer's update: params that require grad (DeepSpeed's fp32 partitions) are written in place
def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                grad_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> None:
    """AdamW step `step` (counted from 1, this step included) in place on param, exp_avg and exp_avg_sq (1-D,
    contiguous, fp32) from grad (bf16/fp16/fp32, not modified) divided by grad_scale (a one-element fp32 tensor on
    param's device; read on the device, never synced) when given; out (bf16/fp16/fp32) receives the updated param in
    its dtype when given."""
    _check("param", param, _FP32_ONLY, None)
    _check("grad", grad, _FLOATS, param)
    _check("exp_avg", exp_avg, _FP32_ONLY, param)
    _check("exp_avg_sq", exp_avg_sq, _FP32_ONLY, param)
    if out is not None:
        _check("out", out, _FLOATS, param)
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32
                                   or grad_scale.device != param.device):
        raise ValueError(f"adamw_step_: grad_scale must be one fp32 element on {param.device}, got "
                         f"{grad_scale.numel()} x {grad_scale.dtype} on {grad_scale.device}")
    if step < 1:
        raise ValueError(f"adamw_step_: step counts from 1 (this step included), got {step}")
    # Bias corrections in double on the host, as torch's AdamW; the kernel gets them rounded to fp32 once.
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    scalars = dict(lr_wd=lr * weight_decay, beta1=beta1, beta2=beta2, eps=eps, step_size=lr / bias_correction1,
                   bias_correction2_sqrt=bias_correction2_sqrt)
    if use_triton(param):
        from framework.ops.triton_kernels import adamw_step_ as adamw_step_kernel  # noqa: PLC0415
        adamw_step_kernel(param, grad, exp_avg, exp_avg_sq, out, grad_scale, **scalars)
        return
    _adamw_step_torch(param, grad, exp_avg, exp_avg_sq, out, grad_scale, **scalars)
