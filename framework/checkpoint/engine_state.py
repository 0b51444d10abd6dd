"""Saving and resuming the DeepSpeed training engine exactly, under ZeRO-1/2/3 and any expert-parallel size.

Owns: `save_engine_checkpoint` / `load_engine_checkpoint` (collective: every rank calls them) and the tag directory's
`meta.json`, the description of the layout that lets `framework/checkpoint/zero_reader.py` rebuild every full fp32
parameter offline from the optimizer state files alone. A load at the saved topology goes through DeepSpeed's own
load (below); at another world size, ep_size or ZeRO stage it goes through framework/zero/reshard.py, which reads
each rank's new ranges out of the saved partitions with that reader.

What DeepSpeed 0.19.8 does for us and what it does not (deepspeed/runtime/engine.py):
- ZeRO-3: expert parameters carry AutoEP's per-parameter partition group (EDP), so `engine.save_checkpoint` writes one
  `zero_pp_rank_{r}_mp_rank_00_{model,optim}_states.pt` pair per rank, holding that rank's fp32 partition of every
  ZeRO sub-group (dense sub-groups partitioned over the world, expert sub-groups over the rank's EDP group) plus the
  Adam moments, and `ds_zero_partition_groups`; `load_checkpoint` reloads the rank's own partition (same topology only).
  Used as it is.
- ZeRO-1/2 with ep > 1: the MoE blocks are `deepspeed.moe.layer.MoE` layers (`framework/zero/deepspeed_moe.py`), which
  makes DeepSpeed's `save_checkpoint` take `_save_moe_checkpoint`, whose per-expert regex (`deepspeed_experts.<i>`)
  fails on our stacked experts (`int(None)`), and whose load expects those per-expert files. We present the engine as
  non-MoE to DeepSpeed's save and load (`has_moe_layers` False for the duration of the call): the per-rank optimizer
  files then hold every rank's fp32 partitions (expert groups partitioned over EDP) and Adam moments, which reload
  exactly; the one module-states file (data-parallel rank 0) holds only EP rank 0's experts, so the rank with EDP rank
  0 of every EP rank also writes `expert_states_ep_rank_{e}.pt` with its experts' module weights, restored after
  DeepSpeed's load (without them EP rank 1.. would resume with EP rank 0's experts in its forward pass: measured, the
  losses differ). The same path serves ZeRO-1 with bf16 weights and fp32 gradient accumulation (DeepSpeed's
  BF16_Optimizer).
- DeepSpeed copies `zero_to_fp32.py` / `zero_to_torch.py` into the checkpoint root (outside the tag directory); both
  would mis-assemble these checkpoints (one partition count for every parameter), so the copy is skipped (use
  tools/ds_to_hf.py). No `latest` file is written (the caller owns it), and nothing written depends on the tag
  directory's name.
- ZeRO-0 and NVMe optimizer offload are refused with one line (their state lives elsewhere).
- `client_state` is stored under one key of its own, so it never collides with DeepSpeed's keys and comes back as it
  was given.
- Persistent buffers (a DeepSeek-V3 router's `e_score_correction_bias`, which auxiliary-loss-free balancing moves) are
  in no optimizer file, and DeepSpeed's module file is not read by the resharding load: rank 0 writes them all to
  `buffers.pt` (they are the same on every rank: dense, and updated from all-reduced counts), and every load restores
  them from it, whatever the layout.

meta.json (format `FORMAT`, version `VERSION`):
  world_size, ep_size, edp_size, zero_stage, dtype (model parameters: float32 / bfloat16 / float16), deepspeed_version,
  num_experts, expert_ranges ([lo, hi) per EP rank), ep_groups (global ranks of each EP group), edp_groups (global
  ranks of the EDP group of each EP rank, in partition order), params ({name: {shape: full shape, local_shape: shape on
  one rank, expert: bool}} in module order), buffers ({name: {shape, dtype}}: the persistent buffers, in `buffers.pt`),
  files ({optim: [per global rank], model: [...], experts: [per EP rank], buffers: "buffers.pt" when there are any}),
  optimizer_groups: one entry per flat fp32 group (the same on every rank): {partition: "world" | "edp",
  partition_count, params: [[name, offset, numel], ...]} where, for ZeRO-3, `offset` is where the parameter's partition
  starts in each rank's flat group and `numel` its partition size (every partition of a parameter has that size; the
  last one is padded), and for ZeRO-1/2, `offset` is where the whole parameter starts in the group's flat buffer,
  `numel` its size, and the entry also has `partition_size` (rank k holds flat elements [k*size, (k+1)*size)).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from framework.checkpoint.atomic_dir import write_text_atomic
from framework.checkpoint.zero_reader import FORMAT, META_NAME, VERSION, read_meta
from framework.moe.layer import MoEBlock
from framework.parallel.groups import ParallelGroups

CLIENT_STATE_KEY = "framework_client_state"
EXPERT_STATES_NAME = "expert_states_ep_rank_{:03d}.pt"
BUFFERS_NAME = "buffers.pt"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------------------------------------------------
# layout description


def _expert_param_ids(module: torch.nn.Module) -> dict[int, MoEBlock]:
    out = {}
    for block in (m for m in module.modules() if isinstance(m, MoEBlock)):
        for p in block.experts.parameters():
            out[id(p)] = block
    return out


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (not the rebuilt ones like rotary inv_freq), by name; read off the modules, not
    through state_dict(), which ZeRO-3 may hook."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _group_ranks(group) -> list[int]:
    return [dist.get_global_rank(group, k) for k in range(dist.get_world_size(group=group))]


def _local_shape(p: torch.nn.Parameter) -> list[int]:
    return list(getattr(p, "ds_shape", p.shape))


def _flat_groups_layout(engine) -> tuple[list[dict], list[list[int]]]:
    """This rank's flat fp32 groups: [{params: [[name, offset, numel]], partition_count, partition_size?}] and the
    global ranks each group is partitioned over."""
    opt = engine.optimizer
    names = engine.param_names  # param -> name (DeepSpeed's own map, the names its files use)
    layout, ranks = [], []
    if engine.zero_optimization_stage() == 3:
        for i, sub_group in enumerate(opt.fp16_groups):
            entries, offset = [], 0
            for p in sub_group:
                numel = int(p.partition_numel())
                entries.append([names[p], offset, numel])
                offset += numel
            layout.append({"partition_count": int(opt.sub_group_partition_counts[i]), "params": entries})
            ranks.append(_group_ranks(opt.sub_group_process_groups[i]))
        return layout, ranks
    # ZeRO-1/2 (DeepSpeedZeroOptimizer) or ZeRO-1 with bf16 weights and fp32 gradients (BF16_Optimizer)
    params = getattr(opt, "round_robin_bit16_groups", None) or getattr(opt, "bf16_groups", None)
    flats = getattr(opt, "bit16_groups_flat", None) or getattr(opt, "bf16_groups_flat", None)
    if params is None or flats is None:
        raise NotImplementedError(f"checkpoints: unsupported ZeRO optimizer {type(opt).__name__}")
    offsets = getattr(opt, "round_robin_bit16_offsets", None)
    for i, group in enumerate(params):
        count = int(opt.partition_count[i])
        if offsets is not None:
            group_offsets = list(offsets[i])
        else:
            group_offsets, acc = [], 0
            for p in group:
                group_offsets.append(acc)
                acc += p.numel()
        entries = [[names[p], int(o), int(p.numel())] for p, o in zip(group, group_offsets)]
        flat_numel = flats[i].numel()
        if flat_numel % count:
            raise RuntimeError(f"ZeRO group {i}: flat buffer of {flat_numel} elements does not split into {count}")
        layout.append({"partition_count": count, "partition_size": flat_numel // count, "params": entries})
        ranks.append(_group_ranks(opt.real_dp_process_group[i]))
    return layout, ranks


def _build_meta(engine, groups: ParallelGroups) -> dict[str, Any]:
    """meta.json's content, checked to be the same on every rank (collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    stage = engine.zero_optimization_stage()
    module = engine.module
    expert_ids = _expert_param_ids(module)
    blocks = {b.num_experts for b in expert_ids.values()}
    if len(blocks) > 1:
        raise ValueError(f"checkpoints: MoE blocks with different expert counts {sorted(blocks)} are not supported")
    num_experts = blocks.pop() if blocks else 0
    ep = groups.ep_size
    params = {}
    first_dtype = None
    for name, p in module.named_parameters():
        local = _local_shape(p)
        expert = id(p) in expert_ids
        full = [local[0] * ep, *local[1:]] if expert else local
        params[name] = {"shape": full, "local_shape": local, "expert": expert}
        if first_dtype is None:
            first_dtype = p.dtype
    layout, group_ranks = _flat_groups_layout(engine)
    local = {
        "rank": rank, "ep_rank": groups.ep_rank,
        "ep_group": _group_ranks(groups.ep_group), "edp_group": _group_ranks(groups.edp_group),
        "optim": os.path.basename(engine._get_zero_ckpt_name("", "t")),
        "model": os.path.basename(engine._get_ckpt_name("", "t")),
        "layout": layout, "group_ranks": group_ranks,
    }
    everyone: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(everyone, local)
    everyone.sort(key=lambda d: d["rank"])
    edp_groups = [None] * ep
    ep_groups = []
    for d in everyone:
        if d["layout"] != everyone[0]["layout"]:
            raise RuntimeError(f"checkpoints: rank {d['rank']} has a different ZeRO group layout from rank 0")
        edp_groups[d["ep_rank"]] = edp_groups[d["ep_rank"]] or d["edp_group"]
        if edp_groups[d["ep_rank"]] != d["edp_group"]:
            raise RuntimeError(f"checkpoints: ranks of EP rank {d['ep_rank']} disagree on their EDP group")
        if d["ep_group"] not in ep_groups:
            ep_groups.append(d["ep_group"])
    for i, entry in enumerate(layout):
        kinds = set()
        for d in everyone:
            got = d["group_ranks"][i]
            if got == list(range(world)) and (ep == 1 or got != d["edp_group"]):
                kinds.add("world")
            elif got == d["edp_group"]:
                kinds.add("edp")
            else:
                raise RuntimeError(f"checkpoints: ZeRO group {i} of rank {d['rank']} is partitioned over ranks {got}, "
                                   "neither the world nor the rank's EDP group")
        if len(kinds) != 1:
            raise RuntimeError(f"checkpoints: ZeRO group {i} is partitioned differently on different ranks")
        entry["partition"] = kinds.pop()
        names = {n for n, _, _ in entry["params"]}
        if entry["partition"] == "edp" and not all(params[n]["expert"] for n in names):
            raise RuntimeError(f"checkpoints: ZeRO group {i} is partitioned over EDP but holds non-expert parameters")
        if entry["partition"] == "world" and ep > 1 and any(params[n]["expert"] for n in names):
            raise RuntimeError(f"checkpoints: ZeRO group {i} holds expert parameters but is partitioned over the "
                               "world (expert tags missing?)")
    per = num_experts // ep if num_experts else 0
    return {
        "format": FORMAT, "version": VERSION,
        "world_size": world, "ep_size": ep, "edp_size": world // ep, "zero_stage": stage,
        "dtype": DTYPE_NAMES.get(first_dtype, str(first_dtype).replace("torch.", "")),
        "deepspeed_version": _ds_version(),
        "num_experts": num_experts,
        "expert_ranges": [[e * per, (e + 1) * per] for e in range(ep)],
        "ep_groups": ep_groups, "edp_groups": edp_groups,
        "params": params,
        "buffers": {n: {"shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", "")}
                    for n, b in persistent_buffers(module).items()},
        "files": {"optim": [d["optim"] for d in everyone],
                  "model": sorted({d["model"] for d in everyone}) if stage == 3 else [everyone[0]["model"]],
                  "experts": [EXPERT_STATES_NAME.format(e) for e in range(ep)] if _own_expert_files(engine, ep)
                  else [],
                  **({"buffers": BUFFERS_NAME} if persistent_buffers(module) else {})},
        "optimizer_groups": layout,
    }


def _ds_version() -> str:
    import deepspeed  # noqa: PLC0415

    return deepspeed.__version__


def _own_expert_files(engine, ep: int) -> bool:
    """ZeRO-1/2 with EP: DeepSpeed's module-states file holds EP rank 0's experts only, we write the others."""
    return engine.zero_optimization_stage() in (1, 2) and ep > 1


def _check_supported(engine) -> None:
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise ValueError(f"checkpoints: zero_optimization.stage={stage}; engine checkpoints support ZeRO stages 1, 2 "
                         "and 3")
    if engine.zero_nvme_offload_optimizer():
        raise ValueError("checkpoints: NVMe optimizer offload is not supported (its swap files live outside the "
                         "optimizer state files)")


def _check_same_on_every_rank(buffers: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0 writes the buffers for all: refuse to save if any rank's differ (e.g. a selection bias updated from
    counts that were not all-reduced). Collective; every rank gets the same answer."""
    if not buffers or dist.get_world_size() == 1:
        return
    flat = torch.cat([b.detach().to(device=device, dtype=torch.float64).reshape(-1) for b in buffers.values()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        sizes = [b.numel() for b in buffers.values()]
        first = int(torch.nonzero(hi != lo)[0])
        name = next(n for n, end in zip(buffers, torch.tensor(sizes).cumsum(0).tolist()) if first < end)
        raise RuntimeError(f"checkpoints: buffer {name} differs between ranks; it must be the same everywhere")


@contextmanager
def _as_plain_deepspeed(engine):
    """DeepSpeed's own save/load without its native-MoE paths and without writing recovery scripts outside the tag."""
    saved_moe = engine.has_moe_layers
    engine.has_moe_layers = False
    engine._copy_recovery_script = lambda *_args, **_kwargs: None
    try:
        yield
    finally:
        engine.has_moe_layers = saved_moe
        del engine._copy_recovery_script  # back to the class's method


def _expert_params(engine) -> dict[str, torch.nn.Parameter]:
    ids = _expert_param_ids(engine.module)
    return {n: p for n, p in engine.module.named_parameters() if id(p) in ids}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank. `device` is the engine's: NCCL reduces CUDA tensors only (a CPU tensor there
    fails with "No backend type associated with device type cpu"), gloo CPU ones."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------------------------------
# save / load


def save_engine_checkpoint(engine, groups: ParallelGroups, save_dir: str, tag: str, client_state: dict) -> None:
    """Write the engine's full training state into `save_dir/tag/` (and nothing outside it). Collective."""
    _check_supported(engine)
    meta = _build_meta(engine, groups)
    tag = str(tag)
    tag_dir = os.path.join(save_dir, tag)
    with _as_plain_deepspeed(engine):
        engine.save_checkpoint(save_dir, tag=tag, client_state={CLIENT_STATE_KEY: client_state}, save_latest=False)
    if _own_expert_files(engine, groups.ep_size) and dist.get_rank(group=groups.edp_group) == 0:
        states = {n: p.detach().cpu().clone() for n, p in _expert_params(engine).items()}
        path = os.path.join(tag_dir, EXPERT_STATES_NAME.format(groups.ep_rank))
        torch.save({"ep_rank": groups.ep_rank, "ep_size": groups.ep_size, "state": states}, f"{path}.partial")
        os.replace(f"{path}.partial", path)
    buffers = persistent_buffers(engine.module)
    _check_same_on_every_rank(buffers, engine.device)
    if buffers and dist.get_rank() == 0:
        path = os.path.join(tag_dir, BUFFERS_NAME)
        torch.save({n: b.detach().cpu().clone() for n, b in buffers.items()}, f"{path}.partial")
        os.replace(f"{path}.partial", path)
    dist.barrier()
    if dist.get_rank() == 0:  # last: a tag directory with meta.json is complete
        write_text_atomic(os.path.join(tag_dir, META_NAME), json.dumps(meta, indent=1) + "\n")
    dist.barrier()


def topology_changes(meta: dict, engine, groups: ParallelGroups) -> dict[str, tuple]:
    """{key: (saved, now)} for the layout keys that differ (world_size, ep_size, zero_stage)."""
    here = {"world_size": dist.get_world_size(), "ep_size": groups.ep_size,
            "zero_stage": engine.zero_optimization_stage()}
    return {k: (meta.get(k), v) for k, v in here.items() if meta.get(k) != v}


def _incompatibility(meta: dict, engine, groups: ParallelGroups, tag_dir: str) -> str | None:
    """What makes the checkpoint unloadable into this engine whatever the layout: dtype, parameter names, shapes."""
    dtype = next(engine.module.parameters()).dtype
    here = DTYPE_NAMES.get(dtype, str(dtype))
    if meta.get("dtype") != here:
        return (f"{tag_dir}: checkpoint model dtype is {meta.get('dtype')}, this run's {here}; resume with the "
                "model.dtype it was saved with")
    for name, p in engine.module.named_parameters():
        saved = meta["params"].get(name)
        if saved is None:
            return f"{tag_dir}: checkpoint has no parameter {name}"
        local = _local_shape(p)
        full = [local[0] * groups.ep_size, *local[1:]] if id(p) in _expert_param_ids(engine.module) else local
        if saved["shape"] != full:
            return f"{tag_dir}: {name}: checkpoint has shape {saved['shape']}, the model {full}"
    extra = sorted(set(meta["params"]) - {n for n, _ in engine.module.named_parameters()})
    if extra:
        return f"{tag_dir}: checkpoint parameter {extra[0]} is not in the model"
    saved = meta.get("buffers", {})
    for name, buf in persistent_buffers(engine.module).items():
        if name not in saved:
            return f"{tag_dir}: checkpoint has no buffer {name}"
        if saved[name]["shape"] != list(buf.shape):
            return f"{tag_dir}: buffer {name}: checkpoint has shape {saved[name]['shape']}, the model {list(buf.shape)}"
    extra = sorted(set(saved) - set(persistent_buffers(engine.module)))
    if extra:
        return f"{tag_dir}: checkpoint buffer {extra[0]} is not in the model"
    if saved and not os.path.isfile(os.path.join(tag_dir, meta["files"].get("buffers", BUFFERS_NAME))):
        return f"{tag_dir}: missing checkpoint file {BUFFERS_NAME}"
    return None


@torch.no_grad()
def _restore_buffers(engine, tag_dir: str, meta: dict) -> None:
    """The persistent buffers from `buffers.pt`, in their own dtype (checked against meta.json by _incompatibility)."""
    buffers = persistent_buffers(engine.module)
    if not buffers:
        return
    saved = torch.load(os.path.join(tag_dir, meta["files"]["buffers"]), map_location="cpu", weights_only=True)
    for name, buf in buffers.items():
        buf.copy_(saved[name])


def load_engine_checkpoint(engine, groups: ParallelGroups, load_dir: str, tag: str, lr_scheduler: bool = False) -> dict:
    """Restore weights, fp32 master weights, Adam moments and step counters saved by `save_engine_checkpoint`, at
    the same or any other world size, ep_size and ZeRO stage (framework/zero/reshard.py), with the same model dtype;
    returns the saved client_state. The lr scheduler's state is restored only with `lr_scheduler=True`; the trainer
    instead re-evaluates its config's schedule at the resumed step, so that a changed lr or schedule takes effect. Collective; every check runs on
    every rank before anything is modified. Call it on a freshly built engine (DeepSpeed: a ZeRO-3 engine cannot
    load right after it saved)."""
    _check_supported(engine)
    tag = str(tag)
    tag_dir = os.path.join(load_dir, tag)
    error = None
    reshard = False
    try:
        meta = read_meta(tag_dir)
        error = _incompatibility(meta, engine, groups, tag_dir)
        reshard = bool(topology_changes(meta, engine, groups))
        if error is None and not reshard:
            mine = [meta["files"]["optim"][dist.get_rank()], *meta["files"]["model"]]
            if _own_expert_files(engine, groups.ep_size):
                mine.append(meta["files"]["experts"][groups.ep_rank])
            missing = [f for f in mine if not os.path.isfile(os.path.join(tag_dir, f))]
            if missing:
                error = f"{tag_dir}: missing checkpoint file {missing[0]}"
    except (OSError, ValueError, KeyError) as exc:
        error = str(exc)
    if _any_rank(error is not None, engine.device):
        raise ValueError(error or f"{tag_dir}: another rank could not read this checkpoint (see its error)")
    if _any_rank(reshard, engine.device):
        from framework.zero.reshard import load_resharded  # noqa: PLC0415

        client = load_resharded(engine, groups, tag_dir, lr_scheduler).get(CLIENT_STATE_KEY, {})
        _restore_buffers(engine, tag_dir, meta)
        return client

    with _as_plain_deepspeed(engine):
        load_path, client = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=lr_scheduler)
    if load_path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed did not load the checkpoint")
    if _own_expert_files(engine, groups.ep_size):
        path = os.path.join(tag_dir, meta["files"]["experts"][groups.ep_rank])
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = _expert_params(engine)
        if saved["ep_rank"] != groups.ep_rank or set(saved["state"]) != set(params):
            raise RuntimeError(f"{path}: expert states do not match this rank's experts")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["state"][name])
    _restore_buffers(engine, tag_dir, meta)
    dist.barrier()
    return (client or {}).get(CLIENT_STATE_KEY, {})
