"""Passes over every gradient that DeepSpeed's ZeRO optimizer step makes and a fused fp32 optimizer does not need.

Measured (benchmarks/PERF_NOTES.md, changes 14 and 18): on one H100 at micro batch 1 with checkpointing (4 layers at
Qwen3-30B-A3B widths, 3.1 B parameters and their fp32 states on the GPU) DeepSpeed 0.19.8's ZeRO-3 step took ~100 ms
of a ~150 ms step's device time, and three of its passes are redundant:
- The clipping norm: `get_grad_norm_direct` (stage3.py and stage_1_and_2.py) copies every fp32 gradient partition to
  fp64 (`.to(get_norm_dtype())`) before `.norm()`: 12 bytes moved per parameter (13.9 ms of copies, 8.3 ms of norms).
  On CUDA the norms here accumulate in fp32 and read the fp32 gradients in place (4 bytes per parameter), as
  torch.nn.utils.clip_grad_norm_ does; CUDA's tree reduction keeps that within 1e-5 of fp64 at a billion elements
  (tests/gpu/test_optimizer_step_gpu.py), and the clipping factor it feeds is as close. Elsewhere (CPU processes,
  whose sequential fp32 sums drift by 1e-3 at 1e7 elements) DeepSpeed's fp64 stays.
- Unscaling and clipping: `unscale_and_clip_grads` multiplies every fp32 gradient by 1 / (clip factor x loss scale)
  in a pass of its own (read and write: 11.4 ms) before `optimizer.step()`. torch's fused Adam/AdamW divide the
  gradients by `optimizer.grad_scale` inside their one kernel (the attribute torch.amp.GradScaler uses), so the factor
  is handed over instead. Without a fused torch Adam on the gradients (an offloaded optimizer with DeepSpeed's CPU
  Adam, the foreach implementation), DeepSpeed's own pass runs.
- A copy made twice: ZeRO-3's `_prepare_fp32_grad_for_sub_group` flattens a sub-group's gradient partitions
  (torch.cat, 2 + 2 bytes per element) and then converts the result to fp32. Those partitions are adjacent slices of
  one buffer (grad_partitions_flat_buffer, in the sub-group's order), so the conversion can read that slice directly:
  the same fp32 gradient in one pass instead of two (9.3 ms of cat per step in the same profile), and no flattened
  bf16 copy at the step's memory peak. When the slices are not adjacent (a frozen parameter's zeros), the buffer is
  already fp32 (a view would then be the gradient itself, which the fused optimizer rewrites) or the optimizer is
  offloaded, DeepSpeed's own method runs.

DeepSpeed builds its ZeRO optimizer inside deepspeed.initialize with no hook for any of these choices, so `install()`
changes them on DeepSpeed's two ZeRO optimizer classes, once per process, before any engine exists
(framework/zero/engine.initialize calls it). Everything else in the step is DeepSpeed's.
"""

from __future__ import annotations

import functools

import torch


def _fused_torch_adam(optimizer) -> bool:
    """torch's Adam/AdamW with fused=True: its step divides the gradients by `grad_scale` in-kernel."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def combined_scale(total_norm, loss_scale: float, clip_grad: float, device: torch.device) -> torch.Tensor | None:
    """What DeepSpeed divides the gradients by: the loss scale, times the clipping factor max(1, (norm / loss_scale
    + 1e-6) / clip_grad) when clipping is on; a float32 scalar tensor on `device` (no host sync), or None when that
    is 1 for sure (no clipping, no loss scale)."""
    if clip_grad <= 0:
        return None if loss_scale == 1.0 else torch.full((), float(loss_scale), dtype=torch.float32, device=device)
    norm = torch.as_tensor(total_norm, dtype=torch.float32, device=device).reshape(())
    # DeepSpeed's invalid-norm sentinel is negative; an invalid norm means no finite clipping magnitude
    norm = torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)
    return torch.clamp((norm / loss_scale + 1e-6) / clip_grad, min=1.0) * loss_scale


def _stage3_unscale_and_clip(original, self, sub_group_id, total_norm):
    if self.offload_optimizer or not _fused_torch_adam(self.optimizer):
        return original(self, sub_group_id, total_norm)
    device = self.fp32_partitioned_groups_flat[sub_group_id].device
    self.optimizer.grad_scale = combined_scale(total_norm, self.loss_scale, self.clip_grad, device)
    return None


def _stage12_unscale_and_clip(original, self, grad_groups_flat, total_norm):
    if self.cpu_offload or not _fused_torch_adam(self.optimizer):
        return original(self, grad_groups_flat, total_norm)
    device = grad_groups_flat[0].device if grad_groups_flat else self.device
    self.optimizer.grad_scale = combined_scale(total_norm, self.loss_scale, self.clip_grad, device)
    return None


def adjacent_slices(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view covering `tensors` when they are contiguous 1-D slices, in order and back to back, of one
    base tensor (so that view equals torch.cat(tensors)); None otherwise."""
    if not tensors:
        return None
    base = tensors[0]._base
    if base is None or not base.is_contiguous():
        return None
    start = tensors[0].storage_offset()
    end = start
    for t in tensors:
        if t._base is not base or t.dim() != 1 or not t.is_contiguous() or t.storage_offset() != end:
            return None
        end += t.numel()
    return base.view(-1).narrow(0, start - base.storage_offset(), end - start)


def _stage3_prepare_fp32_grad(original, self, sub_group_id):
    fp32 = self.fp32_partitioned_groups_flat[sub_group_id]
    grads = self.averaged_gradients[sub_group_id]
    flat = None if self.offload_optimizer else adjacent_slices(grads)
    if flat is None or flat.dtype == fp32.dtype or flat.numel() != fp32.numel():
        return original(self, sub_group_id)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - DeepSpeed is imported by install() anyway

    fp32.grad = flat.to(fp32.dtype)  # a new fp32 tensor, as DeepSpeed's flatten(...).to(...) makes
    if not get_accelerator().is_synchronized_device():
        for grad in grads:  # as DeepSpeed does for the partitions its copy read
            grad.record_stream(get_accelerator().current_stream())
    self.averaged_gradients[sub_group_id] = None
    return None


def _norm_dtype() -> torch.dtype:
    return torch.float32 if torch.cuda.is_available() else torch.float64


def _replaced(original, replacement):
    @functools.wraps(original)
    def method(self, *args):
        return replacement(original, self, *args)
    return method


_INSTALLED = False


def install() -> None:
    """Make the three changes on DeepSpeed's ZeRO optimizers for this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: PLC0415

    for module in (stage3, stage_1_and_2):
        module.get_norm_dtype = _norm_dtype
    stage3.DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group = _replaced(
        stage3.DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group, _stage3_prepare_fp32_grad)
    for cls, wrapper in ((stage3.DeepSpeedZeroOptimizer_Stage3, _stage3_unscale_and_clip),
                         (stage_1_and_2.DeepSpeedZeroOptimizer, _stage12_unscale_and_clip)):
        cls.unscale_and_clip_grads = _replaced(cls.unscale_and_clip_grads, wrapper)
    _INSTALLED = True
