"""Loading a checkpoint saved at another world size, ep_size or ZeRO stage into a freshly built engine.

Owns: the resharding load. Every parameter's full fp32 master weight and Adam moments are rebuilt from the saved
partitions (framework/checkpoint/zero_reader.py, memory-mapped, one parameter at a time), cut to what this rank holds
under the new layout (its EP rank's block of experts, then its ZeRO partition), and written into the engine: fp32
master and moments through DeepSpeed's own per-parameter setters (ZeRO-1/2: the `_hp_mapping` fragments that
universal checkpoints load through; ZeRO-3: the local partition setter), the model-dtype weights copied from the fp32
master as an optimizer step would. Adam's step count and the engine's step counters come from the saved files.

Why not DeepSpeed's universal checkpoint: `ds_to_universal` assumes one data-parallel partition count for every
parameter (its ZeRO-3 path reads `partition_count` once) and knows DeepSpeed's own MoE layers only; our experts are
partitioned over the expert-data-parallel group and stacked per EP rank. The reader already joins both, so the
conversion step is not needed: each rank reads only the pages of the saved files it needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.checkpoint.zero_reader import ZeroCheckpointReader, load_state_file
from framework.parallel.groups import ParallelGroups

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _ep_block(full: torch.Tensor, expert: bool, groups: ParallelGroups) -> torch.Tensor:
    """This EP rank's experts of a stacked [E, ...] tensor (the whole tensor for non-expert parameters)."""
    if not expert:
        return full
    per = full.shape[0] // groups.ep_size
    return full.narrow(0, groups.ep_rank * per, per)


def _zero3_partition(opt, param, local: torch.Tensor) -> torch.Tensor:
    """The piece of `local` (the parameter as this rank's module sees it) that this rank holds under ZeRO-3: equal
    partitions of the flattened tensor over the parameter's partition group, the last one zero-padded."""
    size = param.ds_tensor.numel()
    start = opt._get_param_partition_rank(param) * size
    flat = local.reshape(-1)
    piece = torch.zeros(size, dtype=flat.dtype)
    take = max(0, min(size, flat.numel() - start))
    piece[:take] = flat[start:start + take]
    return piece


def _write_param(engine, param, local: dict[str, torch.Tensor]) -> None:
    """Set one parameter's fp32 master, Adam moments and model-dtype weight on this rank."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415

    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        pieces = {k: _zero3_partition(opt, param, v) for k, v in local.items()}
        device = param.ds_tensor.device
        opt.set_local_hp_param(pieces["fp32"].to(device), param)
        for key in ADAM_KEYS:
            opt.set_local_hp_param(pieces[key].to(device), param, key)
        param.ds_tensor.data.copy_(pieces["fp32"].to(device=device, dtype=param.ds_tensor.dtype))
        return
    if not hasattr(param, "_hp_mapping"):
        raise RuntimeError("resharding load: a ZeRO-1/2 parameter has no fp32 fragment mapping (DeepSpeed did not "
                           "link it); cannot place its optimizer state")
    device = param.device
    safe_set_full_fp32_param(param, local["fp32"].to(device))
    for key in ADAM_KEYS:
        safe_set_full_optimizer_state(param, local[key].to(device), key)
    param.data.copy_(local["fp32"].to(device=device, dtype=param.dtype))


def ensure_adam_states(engine) -> None:
    """Adam's moment tensors exist for every fp32 partition, and ZeRO-1/2's per-parameter fragments point at them.

    torch's Adam creates its state on the first step; DeepSpeed's ZeRO-1/2 links the fragments once, after the first
    group's step, so the expert group's fragments (stepped later) stay unlinked (DeepSpeed 0.19.8): re-link."""
    opt = engine.optimizer
    base = opt.optimizer
    # ZeRO-3 empties the torch optimizer's param groups between steps; its flat partitions are the state keys
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for flat in flats:
        state = base.state[flat]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_adam_step(opt, step: int) -> None:
    base = opt.optimizer
    for state in list(base.state.values()):
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step
    for group in base.param_groups:  # DeepSpeed's own Adam keeps the count per group
        if "step" in group:
            group["step"] = step


def load_resharded(engine, groups: ParallelGroups, tag_dir: str, lr_scheduler: bool = False) -> dict:
    """Restore weights, fp32 master weights, Adam moments and step counters from `tag_dir`, whatever world size,
    ep_size and ZeRO stage (1-3) it was saved with. Returns the engine's saved client state dict. Collective only in
    its final barrier; every rank reads the files itself."""
    ensure_adam_states(engine)
    with ZeroCheckpointReader(tag_dir) as reader:
        names = dict(engine.module.named_parameters())
        missing = sorted(set(names) - set(reader.params))
        extra = sorted(set(reader.params) - set(names))
        if missing or extra:
            which = f"the model's {missing[0]} is not in it" if missing else f"its {extra[0]} is not in the model"
            raise ValueError(f"{tag_dir}: checkpoint parameters differ from the model: {which}")
        prefix = None
        for name, param in names.items():
            info = reader.params[name]
            layer = name.rsplit(".", 2)[0]
            if layer != prefix:  # keep the mapped pages near one layer
                reader.release()
                prefix = layer
            local = {key: _ep_block(reader.read(name, key), info.expert, groups) for key in ("fp32", *ADAM_KEYS)}
            expected = list(getattr(param, "ds_shape", param.shape))
            if list(local["fp32"].shape) != expected:
                raise ValueError(f"{tag_dir}: {name}: checkpoint gives this rank shape {list(local['fp32'].shape)}, "
                                 f"the model {expected}")
            with torch.no_grad():
                _write_param(engine, param, local)
        step = reader.optimizer_step()
        saved_groups = reader.param_groups()
        model_file = reader.meta["files"]["model"][0]
        saved = load_state_file(f"{tag_dir}/{model_file}", mmap=False)
    _set_adam_step(engine.optimizer, step)
    # as DeepSpeed's own load does: the saved hyperparameters (the trainer then applies its config's)
    hyper = {k: v for k, v in (saved_groups[0] if saved_groups else {}).items()
             if k in ("lr", "initial_lr", "betas", "eps", "weight_decay")}
    for group in engine.optimizer.param_groups:
        group.update(hyper)
    if lr_scheduler and engine.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for counter in ("global_steps", "global_samples", "skipped_steps"):
        if counter in saved:
            setattr(engine, counter, saved[counter])
    dist.barrier()
    return {k: v for k, v in saved.items() if k not in ("module", "optimizer", "lr_scheduler")}
