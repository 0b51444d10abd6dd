"""Reading full fp32 parameters out of a framework ZeRO checkpoint offline (no GPU, no process group, no DeepSpeed).

Owns: finding the tag directory (a tag directory itself, or a checkpoint root with a `latest` file or an explicit
tag), the tag directory's `meta.json` (written by `framework/checkpoint/engine_state.py`; its docstring describes the
fields), and `ZeroCheckpointReader`, which rebuilds one full parameter at a time from the fp32 master partitions in the
per-rank optimizer state files, whatever the ZeRO stage (1, 2, 3) and expert-parallel size:
- a dense parameter is cut from the partitions of all ranks (ZeRO-3: every rank holds an equal slice of each
  parameter, the last one padded; ZeRO-1/2: the ranks hold consecutive slices of one flat buffer per group);
- an expert parameter [E_local, ...] is rebuilt per EP rank from that EP rank's EDP group, and the EP ranks' blocks
  are stacked in expert order into [E, ...].
Rank files are memory-mapped (`torch.load(mmap=True, weights_only=True)`): only the slices read are paged in, and
`release()` unmaps them, so a caller going layer by layer keeps its memory near one layer.
`read_range` returns one flat range of a full parameter (its fp32 master or an Adam moment) from the partitions that
overlap it: the elastic resume (framework/zero/reshard.py) has each new rank read only the range it will hold.
DeepSpeed's `zero_to_fp32.py` cannot do this: it assumes one partition count for every parameter.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

FORMAT = "moe-framework-zero-checkpoint"
VERSION = 1
META_NAME = "meta.json"
LATEST_NAME = "latest"
_OPTIM_KEY = "optimizer_state_dict"


# ----------------------------------------------------------------------------------------------------------------------
# locating and describing a checkpoint


def resolve_tag_dir(checkpoint: str, tag: str | None = None) -> str:
    """The tag directory for `checkpoint` (a tag directory, or a root holding tag directories and `latest`)."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    if tag is not None:
        tag_dir = os.path.join(checkpoint, tag)
        if not os.path.isdir(tag_dir):
            raise FileNotFoundError(f"{checkpoint}: no checkpoint tag {tag!r} (no directory {tag_dir})")
        return tag_dir
    if os.path.isfile(os.path.join(checkpoint, META_NAME)):
        return checkpoint
    latest = os.path.join(checkpoint, LATEST_NAME)
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{checkpoint}: no checkpoint here: neither {META_NAME} (a tag directory) nor a "
                                f"{LATEST_NAME} file (a checkpoint root); pass --tag or the tag directory")
    with open(latest) as f:
        name = f.read().strip()
    if not name:
        raise ValueError(f"{latest} is empty; pass --tag")
    tag_dir = os.path.join(checkpoint, name)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{latest} names tag {name!r} but there is no directory {tag_dir}")
    return tag_dir


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir}: no {META_NAME} (not a complete framework checkpoint: the save did not "
                                "finish, or this is not a tag directory)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                         f"{FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: format version {meta.get('version')!r}; this code reads version {VERSION}")
    return meta


def check_meta(meta: dict, where: str) -> None:
    """The topology fields agree with each other (one-line ValueError naming the first disagreement)."""
    try:
        world, ep, stage = int(meta["world_size"]), int(meta["ep_size"]), int(meta["zero_stage"])
        optim, edp_groups, groups = meta["files"]["optim"], meta["edp_groups"], meta["optimizer_groups"]
        params, ranges = meta["params"], meta["expert_ranges"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {META_NAME} lacks field {exc}") from None
    if stage not in (1, 2, 3):
        raise ValueError(f"{where}: topology mismatch: zero_stage={stage}, expected 1, 2 or 3")
    if ep < 1 or world % ep:
        raise ValueError(f"{where}: topology mismatch: ep_size={ep} does not divide world_size={world}")
    if len(optim) != world:
        raise ValueError(f"{where}: topology mismatch: world_size={world} but {len(optim)} optimizer state files "
                         "listed")
    if len(edp_groups) != ep or len(ranges) != ep or sorted(r for g in edp_groups for r in g) != list(range(world)):
        raise ValueError(f"{where}: topology mismatch: edp_groups {edp_groups} / expert_ranges {ranges} do not "
                         f"cover world_size={world} with ep_size={ep}")
    for i, group in enumerate(groups):
        count = group["partition_count"]
        expected = world if group["partition"] == "world" else world // ep
        if group["partition"] not in ("world", "edp") or count != expected:
            raise ValueError(f"{where}: topology mismatch: optimizer group {i} is partitioned over "
                             f"{group['partition']!r} in {count} parts; world_size={world}, ep_size={ep}")
        for name, _, _ in group["params"]:
            if name not in params:
                raise ValueError(f"{where}: optimizer group {i} names unknown parameter {name}")


# ----------------------------------------------------------------------------------------------------------------------
# weights_only loading: DeepSpeed pickles a few of its own objects next to the tensors. Stand-ins under their names
# let the restricted unpickler rebuild them as plain data without importing (or trusting) DeepSpeed.


class _Plain:
    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _LossScaler(_Plain):
    pass


class _FragmentAddress(_Plain):
    pass


def _zero_stage_enum(value):
    return int(value)


_SAFE_GLOBALS = [(_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
                 (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
                 (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
                 (_zero_stage_enum, "deepspeed.runtime.zero.config.ZeroStageEnum")]


def load_state_file(path: str, mmap: bool = True) -> dict:
    """torch.load a DeepSpeed state file memory-mapped and with weights_only (the legacy non-zip format cannot be
    mapped: read in full then)."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except RuntimeError as exc:
            if mmap and "zip" in str(exc).lower():
                return torch.load(path, map_location="cpu", weights_only=True)
            raise


# ----------------------------------------------------------------------------------------------------------------------
# the reader


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]  # full
    local_shape: tuple[int, ...]  # one EP rank's block for experts, else the full shape
    expert: bool
    group: int  # index into meta["optimizer_groups"]
    offset: int
    numel: int  # ZeRO-3: the per-rank partition size; ZeRO-1/2: the parameter's size


class ZeroCheckpointReader:
    """Full fp32 parameters of one tag directory. Use as a context manager; call `release()` between layers."""

    def __init__(self, tag_dir: str):
        self.path = tag_dir
        self.meta = read_meta(tag_dir)
        check_meta(self.meta, tag_dir)
        m = self.meta
        self.world_size, self.ep_size, self.zero_stage = m["world_size"], m["ep_size"], m["zero_stage"]
        self.dtype = m.get("dtype", "float32")
        self.num_experts = m.get("num_experts", 0)
        self.groups = m["optimizer_groups"]
        self.params: dict[str, ParamInfo] = {}
        for gi, group in enumerate(self.groups):
            for name, offset, numel in group["params"]:
                p = m["params"][name]
                if name in self.params:
                    raise ValueError(f"{tag_dir}: parameter {name} is in two optimizer groups")
                self.params[name] = ParamInfo(name, tuple(p["shape"]), tuple(p["local_shape"]), bool(p["expert"]),
                                              gi, int(offset), int(numel))
        missing = [n for n in m["params"] if n not in self.params]
        if missing:
            raise ValueError(f"{tag_dir}: parameter {missing[0]} is in no optimizer group (frozen parameters are "
                             "not supported)")
        # names in the module's order (meta["params"] keeps it)
        self.names = [n for n in m["params"]]
        for r, name in enumerate(m["files"]["optim"]):
            if not os.path.isfile(os.path.join(tag_dir, name)):
                raise FileNotFoundError(f"{tag_dir}: missing rank file {name} (optimizer state of rank {r} of "
                                        f"{self.world_size}); the checkpoint is incomplete")
        self._files: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._states: dict[int, dict] = {}

    def __enter__(self) -> "ZeroCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Unmap every rank file (they are mapped again on the next read)."""
        self._files.clear()
        self._states.clear()

    # -- rank files

    def _rank_state(self, rank: int) -> dict:
        state = self._states.get(rank)
        if state is None:
            name = self.meta["files"]["optim"][rank]
            path = os.path.join(self.path, name)
            try:
                state = load_state_file(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.path}: missing rank file {name} (rank {rank})") from None
            except Exception as exc:  # noqa: BLE001 - pickle / zip errors: say which file
                raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            self._states[rank] = state
        return state

    def _flat_groups(self, rank: int, key: str = "fp32") -> list[torch.Tensor]:
        flats = self._files.get((rank, key))
        if flats is None:
            path = os.path.join(self.path, self.meta["files"]["optim"][rank])
            state = self._rank_state(rank)
            flats = self._check_rank_state(rank, path, state)
            if key != "fp32":
                flats = self._moment_flats(path, state, key, flats)
            self._files[(rank, key)] = flats
        return flats

    def _base_optimizer_state(self, path: str, state: dict) -> dict:
        """The wrapped torch optimizer's state_dict: {"state": {group index: {exp_avg, exp_avg_sq, step}}, ...}; one
        flat tensor per group, element for element beside the fp32 master partition."""
        osd = state[_OPTIM_KEY]
        base = osd.get("optimizer_state_dict" if self.zero_stage == 3 else "base_optimizer_state")
        if not isinstance(base, dict) or not isinstance(base.get("state"), dict):
            raise ValueError(f"{path}: no base optimizer state dict (an elastic-format ZeRO file?); cannot read "
                             "optimizer moments")
        return base

    def _moment_flats(self, path: str, state: dict, key: str, fp32: list[torch.Tensor]) -> list[torch.Tensor]:
        per_group = self._base_optimizer_state(path, state)["state"]
        flats = []
        for gi, master in enumerate(fp32):
            entry = per_group.get(gi)
            if entry is None or key not in entry:
                raise ValueError(f"{path}: optimizer group {gi} has no {key!r} state (an optimizer other than Adam?)")
            flat = entry[key]
            if flat.numel() < master.numel():  # ZeRO-1/2 may keep alignment padding after the master's elements
                raise ValueError(f"{path}: {key} of group {gi} has {flat.numel()} elements, the fp32 master "
                                 f"{master.numel()}")
            flats.append(flat)
        return flats

    def optimizer_step(self) -> int:
        """Adam's step count (bias correction), the same in every group and rank."""
        path = os.path.join(self.path, self.meta["files"]["optim"][0])
        steps = {int(entry["step"]) for entry in self._base_optimizer_state(path, self._rank_state(0))["state"].values()
                 if "step" in entry}
        if len(steps) != 1:
            raise ValueError(f"{path}: optimizer groups disagree on Adam's step count: {sorted(steps)}")
        return steps.pop()

    def buffers(self) -> dict[str, torch.Tensor]:
        """The persistent buffers (e.g. routers' e_score_correction_bias) in their saved dtype, by name; {} for a
        model without any or a checkpoint from before they were saved."""
        listed = self.meta.get("buffers") or {}
        if not listed:
            return {}
        path = os.path.join(self.path, self.meta["files"].get("buffers", "buffers.pt"))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.path}: missing {os.path.basename(path)} (the persistent buffers "
                                    f"{', '.join(sorted(listed)[:2])} ...); the checkpoint is incomplete")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if set(saved) != set(listed):
            raise ValueError(f"{path}: holds buffers {sorted(saved)}, meta.json lists {sorted(listed)}")
        return {name: saved[name] for name in listed}

    def param_groups(self) -> list[dict]:
        """The saved optimizer hyperparameters (lr, betas, eps, weight_decay) per group, from rank 0."""
        path = os.path.join(self.path, self.meta["files"]["optim"][0])
        return [{k: v for k, v in g.items() if k != "params"}
                for g in self._base_optimizer_state(path, self._rank_state(0)).get("param_groups", [])]

    def _check_rank_state(self, rank: int, path: str, state: dict) -> list[torch.Tensor]:
        """The rank's flat fp32 groups, after checking the file against meta.json."""
        osd = state.get(_OPTIM_KEY) if isinstance(state, dict) else None
        if not isinstance(osd, dict):
            raise ValueError(f"{path}: no {_OPTIM_KEY}; not a DeepSpeed ZeRO optimizer state file")
        mismatch = f"{path}: topology mismatch with {META_NAME}"
        if self.zero_stage == 3:
            flats = osd.get("fp32_flat_groups")
            if flats is None:
                raise ValueError(f"{mismatch}: no fp32_flat_groups (not a ZeRO-3 file; meta says zero_stage=3)")
            if osd.get("partition_count") != self.world_size:
                raise ValueError(f"{mismatch}: saved by {osd.get('partition_count')} ranks, meta says "
                                 f"world_size={self.world_size}")
            placement = osd.get("ds_zero_partition_groups")
            if placement is not None:
                for gi, entry in enumerate(placement):
                    expected = self._group_ranks(gi, rank)
                    if gi >= len(self.groups) or entry.get("partition_ranks") != expected:
                        raise ValueError(f"{mismatch}: sub-group {gi} is partitioned over ranks "
                                         f"{entry.get('partition_ranks')}, meta says {expected}")
        else:
            flats = osd.get("single_partition_of_fp32_groups")
            if flats is None:
                raise ValueError(f"{mismatch}: no single_partition_of_fp32_groups (not a ZeRO-1/2 file; meta says "
                                 f"zero_stage={self.zero_stage})")
            counts = osd.get("partition_count")
            expected_counts = [g["partition_count"] for g in self.groups]
            if list(counts) != expected_counts:
                raise ValueError(f"{mismatch}: partition counts {list(counts)}, meta says {expected_counts}")
        if len(flats) != len(self.groups):
            raise ValueError(f"{mismatch}: {len(flats)} flat groups, meta says {len(self.groups)}")
        for gi, (flat, group) in enumerate(zip(flats, self.groups)):
            if flat.dtype != torch.float32:
                raise ValueError(f"{path}: flat group {gi} is {flat.dtype}, expected fp32 master weights")
            if self.zero_stage == 3:
                expected = sum(n for _, _, n in group["params"])
                if flat.numel() != expected:
                    raise ValueError(f"{mismatch}: flat group {gi} has {flat.numel()} elements, meta says {expected}")
            elif flat.numel() > group["partition_size"]:
                raise ValueError(f"{mismatch}: flat group {gi} has {flat.numel()} elements, more than the partition "
                                 f"size {group['partition_size']}")
        return list(flats)

    def _group_ranks(self, gi: int, rank: int) -> list[int]:
        """The ranks group `gi` of `rank` is partitioned over, in partition order."""
        if self.groups[gi]["partition"] == "world":
            return list(range(self.world_size))
        return next(g for g in self.meta["edp_groups"] if rank in g)

    # -- parameters

    def read(self, name: str, key: str = "fp32") -> torch.Tensor:
        """The full fp32 parameter (key "fp32") or its Adam moment ("exp_avg", "exp_avg_sq"): a new tensor, not a
        view into a mapped file."""
        info = self._info(name)
        return self.read_range(name, key, 0, math.prod(info.shape)).view(info.shape)

    def read_range(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened full parameter (experts: all EP blocks in expert order), reading
        only the saved partitions that hold them: a rank of another layout reads its own share, not everything."""
        info = self._info(name)
        out = torch.empty(end - start, dtype=torch.float32)
        if self.groups[info.group]["partition"] == "edp":
            block = math.prod(info.local_shape)
            if block * self.ep_size != math.prod(info.shape):
                raise ValueError(f"{self.path}: {name}: {self.ep_size} EP blocks of {list(info.local_shape)} do not "
                                 f"make {list(info.shape)}")
            for e, ranks in enumerate(self.meta["edp_groups"]):
                lo, hi = max(start, e * block), min(end, (e + 1) * block)
                if lo < hi:
                    out[lo - start:hi - start] = self._replica_range(info, ranks, lo - e * block, hi - e * block,
                                                                     block, key)
        else:
            if info.local_shape != info.shape:
                raise ValueError(f"{self.path}: {name} is partitioned over the world but holds one EP rank's block "
                                 f"{list(info.local_shape)} of {list(info.shape)}")
            out[:] = self._replica_range(info, list(range(self.world_size)), start, end, math.prod(info.shape), key)
        return out

    def _info(self, name: str) -> ParamInfo:
        info = self.params.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no parameter {name}")
        return info

    def _replica_range(self, info: ParamInfo, ranks: list[int], start: int, end: int, numel: int,
                       key: str) -> torch.Tensor:
        """Elements [start, end) of the flattened parameter (experts: one EP block of `numel` elements) as the
        partition group `ranks` holds it."""
        out = torch.empty(end - start, dtype=torch.float32)
        if self.zero_stage == 3:
            step = info.numel  # every rank holds `step` elements of the parameter; the last one padded
            if step * len(ranks) < numel:
                raise ValueError(f"{self.path}: {info.name}: {len(ranks)} partitions of {step} cannot hold {numel}")
            for k in range(start // step, (end - 1) // step + 1 if end > start else 0):
                lo, hi = max(start, k * step), min(end, (k + 1) * step)
                out[lo - start:hi - start] = self._slice(ranks[k], info, info.offset + lo - k * step,
                                                         info.offset + hi - k * step, key)
            return out
        size = self.groups[info.group]["partition_size"]
        first = info.offset  # where the parameter starts in its group's flat buffer
        if info.numel != numel or first + numel > size * len(ranks):
            raise ValueError(f"{self.path}: {info.name}: {info.numel} elements at {first} do not fit its group "
                             f"({len(ranks)} partitions of {size})")
        lo_flat, hi_flat = first + start, first + end
        for k in range(lo_flat // size, (hi_flat - 1) // size + 1 if end > start else 0):
            lo, hi = max(lo_flat, k * size), min(hi_flat, (k + 1) * size)
            out[lo - lo_flat:hi - lo_flat] = self._slice(ranks[k], info, lo - k * size, hi - k * size, key)
        return out

    def _slice(self, rank: int, info: ParamInfo, lo: int, hi: int, key: str) -> torch.Tensor:
        flat = self._flat_groups(rank, key)[info.group]
        if hi > flat.numel():
            raise ValueError(f"{self.path}: {self.meta['files']['optim'][rank]}: {info.name} needs elements "
                             f"{lo}..{hi} of flat group {info.group}, which has {flat.numel()} (topology mismatch)")
        return flat[lo:hi]
