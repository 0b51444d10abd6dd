"""Loading a checkpoint saved at another world size, ep_size or ZeRO stage into a freshly built engine.

Owns: the resharding load. For every parameter, each rank reads from the saved partitions only the range it holds
under the new layout (framework/checkpoint/zero_reader.py `read_range`, memory-mapped, one parameter at a time): its
EP rank's experts, then its ZeRO-3 partition or its ZeRO-1/2 fp32 fragment, for the fp32 master and both Adam
moments. These go in through DeepSpeed's own setters (ZeRO-3: the local partition setter; ZeRO-1/2: the `_hp_mapping`
fragments universal checkpoints load through); the model-dtype weights are cast from the fp32 master as an optimizer
step would (ZeRO-1/2 ranks hold the whole weight, so they read its fp32 master whole). Adam's step count and the
engine's step counters come from the saved files.

Why not DeepSpeed's universal checkpoint: `ds_to_universal` assumes one data-parallel partition count for every
parameter (its ZeRO-3 path reads `partition_count` once) and knows DeepSpeed's own MoE layers only; our experts are
partitioned over the expert-data-parallel group and stacked per EP rank. The reader already joins both, so the
conversion step is not needed: each rank reads only the pages of the saved files it needs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from framework.checkpoint.zero_reader import ZeroCheckpointReader, load_state_file
from framework.parallel.groups import ParallelGroups

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _zero3_write(engine, param, read) -> None:
    """This rank's ZeRO-3 partition of the parameter (equal parts of the flattened tensor over its partition group,
    the last zero-padded): fp32 master, Adam moments, and the model-dtype partition from the master."""
    opt = engine.optimizer
    size = param.ds_tensor.numel()
    start = opt._get_param_partition_rank(param) * size
    take = max(0, min(size, param.ds_numel - start))
    device = param.ds_tensor.device
    pieces = {}
    for key in ("fp32", *ADAM_KEYS):
        piece = torch.zeros(size, dtype=torch.float32)
        if take:
            piece[:take] = read(key, start, start + take)
        pieces[key] = piece.to(device)
        opt.set_local_hp_param(pieces[key], param, None if key == "fp32" else key)
    param.ds_tensor.data.copy_(pieces["fp32"].to(param.ds_tensor.dtype))


def _zero12_write(param, read) -> None:
    """ZeRO-1/2: this rank's fragment of the fp32 master and moments (DeepSpeed's `_hp_mapping`, as universal
    checkpoints load), and the whole model-dtype parameter, which every rank of the group holds."""
    mapping = param._hp_mapping
    if mapping is not None:  # None: the parameter lies wholly in other ranks' partitions
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        for key in ("fp32", *ADAM_KEYS):
            target = mapping.get_hp_fragment(None if key == "fp32" else key)
            target.data.copy_(read(key, start, start + numel).to(target.device).view_as(target))
    full = read("fp32", 0, param.numel()).view(param.shape)
    param.data.copy_(full.to(device=param.device, dtype=param.dtype))


def ensure_adam_states(engine) -> None:
    """Adam's moment tensors exist for every fp32 partition, and ZeRO-1/2's per-parameter fragments point at them.

    torch's Adam creates its state on the first step; DeepSpeed's ZeRO-1/2 links the fragments once, after the first
    group's step, so the expert group's fragments (stepped later) stay unlinked (DeepSpeed 0.19.8): re-link."""
    opt = engine.optimizer
    base = opt.optimizer
    # ZeRO-3 empties the torch optimizer's param groups between steps; its flat partitions are the state keys
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    # torch's Adam keeps the step as a tensor; DeepSpeed's CPU Adam (optimizer offload) passes it to C++ as an int
    torch_adam = type(base).__module__.startswith("torch.optim")
    for flat in flats:
        state = base.state[flat]
        if "exp_avg" not in state:
            state["step"] = (torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
                             if torch_adam else 0)
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
        stage = engine.zero_optimization_stage()
        for name, param in names.items():
            info = reader.params[name]
            layer = name.rsplit(".", 2)[0]
            if layer != prefix:  # keep the mapped pages near one layer
                reader.release()
                prefix = layer
            expected = list(getattr(param, "ds_shape", param.shape))
            here = [expected[0] * groups.ep_size, *expected[1:]] if info.expert else expected
            if here != list(info.shape):
                raise ValueError(f"{tag_dir}: {name}: checkpoint has shape {list(info.shape)}, the model {here}")
            # where this rank's block starts in the flattened full tensor: its EP rank's experts, or everything
            offset = groups.ep_rank * math.prod(expected) if info.expert else 0

            def read(key: str, lo: int, hi: int, name=name, offset=offset) -> torch.Tensor:
                return reader.read_range(name, key, offset + lo, offset + hi)

            if stage == 3 and not hasattr(param, "ds_tensor"):
                raise RuntimeError(f"resharding load: ZeRO-3 parameter {name} has no partition")
            if stage != 3 and not hasattr(param, "_hp_mapping"):
                raise RuntimeError("resharding load: a ZeRO-1/2 parameter has no fp32 fragment mapping (DeepSpeed "
                                   "did not link it); cannot place its optimizer state")
            with torch.no_grad():
                (_zero3_write(engine, param, read) if stage == 3 else _zero12_write(param, read))
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
