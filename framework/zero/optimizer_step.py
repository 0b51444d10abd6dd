"""Passes over every gradient that DeepSpeed's ZeRO optimizer step makes and a fused fp32 optimizer does not need.

Measured (benchmarks/PERF_NOTES.md, changes 14 and 18): on one H100 at micro batch 1 with checkpointing (4 layers at
Qwen3-30B-A3B widths, 3.1 B parameters and their fp32 states on the GPU) DeepSpeed 0.19.8's ZeRO-3 step took ~100 ms
of a ~150 ms step's device time, and several of its passes are redundant:
- The clipping norm: `get_grad_norm_direct` (stage3.py and stage_1_and_2.py) copies every fp32 gradient partition to
  fp64 (`.to(get_norm_dtype())`) before `.norm()`: 12 bytes moved per parameter (13.9 ms of copies, 8.3 ms of norms).
  On CUDA the norms here accumulate in fp32 and read the fp32 gradients in place (4 bytes per parameter), as
  torch.nn.utils.clip_grad_norm_ does; CUDA's tree reduction keeps that within 1e-5 of fp64 at a billion elements
  (tests/gpu/test_optimizer_step_gpu.py), and the clipping factor it feeds is as close. Elsewhere (CPU processes,
  whose sequential fp32 sums drift by 1e-3 at 1e7 elements) DeepSpeed's fp64 stays. DeepSpeed still converts each
  gradient to that dtype before its norm (`g.to(dtype).norm()`: for the bf16 partitions 2 bytes read, 4 written and 4
  read again); the per-tensor norms are taken here in one multi-tensor pass that reads the bf16 gradients and
  accumulates in the norm dtype (torch._foreach_norm with dtype, as torch's clip_grad_norm_ does), and DeepSpeed's
  method then combines one-element tensors holding those norms, so its reductions over ranks, its model-parallel
  filter and its invalid-norm sentinel are its own.
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

- Under ZeRO-3 with torch's AdamW (the shipped optimizer) and bf16 gradients, the fp32 gradient is not made at all:
  the conversion above (2 + 4 bytes per parameter), torch's fused AdamW (which writes the unscaled gradient back, 4
  bytes) and the fp32 -> bf16 parameter copy `_reassign_or_swap_out_partitioned_parameters` makes after the step (4 +
  2 bytes) become one pass (framework/ops/adamw.py) that reads the bf16 gradient slice and the fp32 parameter and
  states and writes the states, the fp32 parameter and its bf16 copy: 28 bytes per parameter instead of 44, and no
  fp32 gradient at the step's memory peak. The optimizer's state (step, exp_avg, exp_avg_sq) is torch AdamW's own, so
  checkpoints and the fallbacks read and write the same thing. ZeRO-1/2 make their fp32 gradient and bf16 copy
  inline in DeepSpeed's step, so there the same pass only replaces torch's AdamW (no gradient written back).

DeepSpeed builds its ZeRO optimizer inside deepspeed.initialize with no hook for any of these choices, so `install()`
changes them on DeepSpeed's two ZeRO optimizer classes, once per process, before any engine exists
(framework/zero/engine.initialize calls it). Everything else in the step is DeepSpeed's.
"""

from __future__ import annotations

import torch

from framework.zero.method_patch import replace_method


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
    if sub_group_id in _pending(self) or (not self.offload_optimizer and _fused_torch_adam(self.optimizer)):
        device = self.fp32_partitioned_groups_flat[sub_group_id].device
        self.optimizer.grad_scale = combined_scale(total_norm, self.loss_scale, self.clip_grad, device)
        return None
    self.optimizer.grad_scale = None  # DeepSpeed's pass divides: no factor may reach torch's step twice
    return original(self, sub_group_id, total_norm)


def _stage12_unscale_and_clip(original, self, grad_groups_flat, total_norm):
    if not self.cpu_offload and (_in_place_step_applies(self) or _fused_torch_adam(self.optimizer)):
        device = grad_groups_flat[0].device if grad_groups_flat else self.device
        self.optimizer.grad_scale = combined_scale(total_norm, self.loss_scale, self.clip_grad, device)
        return None
    self.optimizer.grad_scale = None
    return original(self, grad_groups_flat, total_norm)


def _stage12_optimizer_step(original, self, group_no):
    fp32 = self.single_partition_of_fp32_groups[group_no]
    if self.cpu_offload or not _in_place_step_applies(self) or fp32.grad is None:
        return _deepspeeds_step(original, self, group_no, fp32)
    # DeepSpeed made the fp32 gradient already (inline in its step); done here, the step neither writes the
    # unscaled gradient back, as torch's fused AdamW does with grad_scale, nor needs a pass of its own to unscale
    step_adamw(self.optimizer, fp32, fp32.grad, self.optimizer.param_groups[group_no], None)
    self._lazy_init_hp_params_optimizer_state()  # as DeepSpeed's _optimizer_step does after a step
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


def _pending(zero_optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-3 sub-groups whose bf16 gradient (a view of DeepSpeed's gradient buffer) goes to the in-place step, from
    the gradient's preparation to the parameters' reassignment after the step."""
    # lives on DeepSpeed's optimizer, which is built inside deepspeed.initialize: no constructor of ours to put it in
    return zero_optimizer.__dict__.setdefault("_framework_low_precision_grads", {})


def _stage3_prepare_fp32_grad(original, self, sub_group_id):
    fp32 = self.fp32_partitioned_groups_flat[sub_group_id]
    grads = self.averaged_gradients[sub_group_id]
    flat = None if self.offload_optimizer else adjacent_slices(grads)
    if flat is None or flat.dtype == fp32.dtype or flat.numel() != fp32.numel():
        return original(self, sub_group_id)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - DeepSpeed is imported by install() anyway

    if _in_place_step_applies(self):
        _pending(self)[sub_group_id] = flat  # read by _stage3_optimizer_step: no fp32 copy
    else:
        fp32.grad = flat.to(fp32.dtype)  # a new fp32 tensor, as DeepSpeed's flatten(...).to(...) makes
    if not get_accelerator().is_synchronized_device():
        for grad in grads:  # as DeepSpeed does for the partitions its copy read
            grad.record_stream(get_accelerator().current_stream())
    self.averaged_gradients[sub_group_id] = None
    return None


def _in_place_step_applies(self) -> bool:
    """The ZeRO optimizer wraps torch's AdamW with the settings framework/ops/adamw.py implements (no amsgrad,
    maximize or tensor lr), and nothing else takes part in its step (a GradScaler, ZenFlow, Muon)."""
    optimizer = self.optimizer
    return (type(optimizer) is torch.optim.AdamW and all(
        not group.get("amsgrad") and not group.get("maximize") and not group.get("differentiable")
        and not isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups)
        and getattr(self, "torch_autocast_gradscaler", None) is None and not getattr(self, "zenflow", False)
        and not getattr(self, "use_muon", False))


def _stage3_optimizer_step(original, self, sub_group_id):
    grad = _pending(self).get(sub_group_id)  # dropped by _stage3_reassign_partitioned_parameters, next
    fp32 = self.fp32_partitioned_groups_flat[sub_group_id]
    if grad is None:
        return _deepspeeds_step(original, self, sub_group_id, fp32)
    group = self.optimizer.param_groups[self.sub_group_to_group_id[sub_group_id]]
    step_adamw(self.optimizer, fp32, grad, group, _bf16_partition(self, sub_group_id))
    return False  # DeepSpeed's "swappable" answer: nothing is swapped without an offloaded optimizer


def _bf16_partition(self, sub_group_id: int) -> torch.Tensor | None:
    """The sub-group's flat low-precision partition when the in-place step can write it directly."""
    low, fp32 = self.fp16_partitioned_groups_flat[sub_group_id], self.fp32_partitioned_groups_flat[sub_group_id]
    ok = low is not None and low.dtype != fp32.dtype and low.is_contiguous() and low.numel() == fp32.numel()
    return low if ok else None


def _stage3_reassign_partitioned_parameters(original, self, sub_group_id):
    if _pending(self).pop(sub_group_id, None) is not None and _bf16_partition(self, sub_group_id) is not None:
        self._unflatten_partitioned_parameters(sub_group_id)  # the bf16 partition already holds the new values
        return None
    return original(self, sub_group_id)


def step_adamw(optimizer: torch.optim.AdamW, param: torch.Tensor, grad: torch.Tensor, group: dict,
               out: torch.Tensor | None) -> None:
    """One AdamW step of `param` (an fp32 flat partition) from `grad` (any float dtype, same numel) divided by
    `optimizer.grad_scale` (when set: the unscale-and-clip factor), with `group`'s hyperparameters, on `optimizer`'s
    own state for `param` (made as torch's AdamW makes it on its first step); `out`, if given, receives the updated
    parameter in its dtype."""
    from framework.ops.adamw import adamw_step_  # noqa: PLC0415

    state = optimizer.state[param]
    if not state:
        # torch's layout: the step count is a device tensor for a fused or capturable AdamW, a CPU one otherwise
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    adamw_step_(param, grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], step=_advance_host_step(state["step"]),
                grad_scale=getattr(optimizer, "grad_scale", None), out=out)


_HOST_STEP = "_framework_host_step"


def _advance_host_step(step: torch.Tensor) -> int:
    """Add 1 to `state["step"]` and return the new count as a number, which the bias corrections need. Reading a
    device-resident count would sync the device every step, so the count is mirrored in an attribute of the tensor
    itself: a state loaded from a checkpoint (new tensors) is read once, and a step torch's optimizer made instead
    drops the mirror (_forget_host_step)."""
    known = getattr(step, _HOST_STEP, None)
    count = (int(step.item()) if known is None else known) + 1
    step.add_(1)
    setattr(step, _HOST_STEP, count)
    return count


def _deepspeeds_step(original, self, group: int, fp32: torch.Tensor):
    """DeepSpeed's own `_optimizer_step` of `group`, whose optimizer step moves `fp32`'s step count past the host
    mirror: the mirror is dropped, to be read again by the next in-place step."""
    result = original(self, group)
    _forget_host_step(self.optimizer.state.get(fp32, {}).get("step"))
    return result


def _forget_host_step(step: torch.Tensor | None) -> None:
    if step is not None and hasattr(step, _HOST_STEP):
        delattr(step, _HOST_STEP)


def _grad_norm_from_norms(original, self, gradients, params, norm_type=2):
    if float(norm_type) != 2.0 or not gradients:
        return original(self, gradients, params, norm_type)
    # ZeRO-1/2 skip the alignment padding in gradients (not in params); the norms list must line up the same way
    real = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    norms = torch._foreach_norm(real, 2, dtype=_norm_dtype()) if real else []
    # a one-element tensor's 2-norm is its value: DeepSpeed's per-tensor .to(dtype).norm() on these is exact
    return original(self, [n.reshape(1) for n in norms], params, norm_type)


def _norm_dtype() -> torch.dtype:
    return torch.float32 if torch.cuda.is_available() else torch.float64


def install() -> None:
    """Make these changes on DeepSpeed's ZeRO optimizers for this process (idempotent)."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: PLC0415

    for module in (stage3, stage_1_and_2):
        module.get_norm_dtype = _norm_dtype
    zero3, zero12 = stage3.DeepSpeedZeroOptimizer_Stage3, stage_1_and_2.DeepSpeedZeroOptimizer
    for cls in (zero3, zero12):
        replace_method(cls, "get_grad_norm_direct", _grad_norm_from_norms)
    replace_method(zero3, "_prepare_fp32_grad_for_sub_group", _stage3_prepare_fp32_grad)
    replace_method(zero3, "_optimizer_step", _stage3_optimizer_step)
    replace_method(zero3, "_reassign_or_swap_out_partitioned_parameters", _stage3_reassign_partitioned_parameters)
    replace_method(zero3, "unscale_and_clip_grads", _stage3_unscale_and_clip)
    replace_method(zero12, "_optimizer_step", _stage12_optimizer_step)
    replace_method(zero12, "unscale_and_clip_grads", _stage12_unscale_and_clip)
