"""Where training checkpoints live and how they become complete: atomic saves, `latest`, keep-last-K, resume lookup.

Layout: OUTPUT_DIR/checkpoints/step_00000100/ (engine state from framework/checkpoint/engine_state.py, the HF
config.json, the tokenizer, run_config.yaml, and one trainer_state_rank{R}.pt per rank: data position + RNG states),
OUTPUT_DIR/checkpoints/latest (the newest complete tag). A save is written under a dot-prefixed temporary name and
renamed once every rank has finished, and `latest` is replaced atomically after that: a process killed at any moment
leaves the previous checkpoint as the one `--resume auto` finds. Checkpoints must be on a filesystem all nodes see. Each
tag directory also gets a manifest.json (sizes and checksums, framework/checkpoint/integrity.py) just before its rename;
resume verifies it. A save that would not fit on the disk is not started (check_free_space), and one that fails while
writing leaves no temporary directory behind.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from framework.checkpoint.integrity import read_latest, step_tags, write_manifest
from framework.train.errors import CheckpointSaveFailed, DiskFull

TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a pickled object: used once per resume and per save, where its cost is
    nothing next to the checkpoint's)."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fault(name: str, step: int) -> bool:
    """Fault injection for the tests, as trainer._fault_point: FRAMEWORK_FAULT=disk_full:4 (the free-space query
    reports 0 bytes before step 4's save), save_error:4 (writing step 4's checkpoint fails with ENOSPC)."""
    return os.environ.get("FRAMEWORK_FAULT") == f"{name}:{step}"


def complete_tags(root: str) -> list[str]:
    return step_tags(root)


def latest_tag(root: str) -> str | None:
    """The tag `latest` names, if that directory exists (for messages; resume goes through resolve_resume)."""
    named = read_latest(root)
    return named if named is not None and os.path.isdir(os.path.join(root, named)) else None


def estimate_checkpoint_bytes(module: torch.nn.Module, ep_size: int, model_dtype: torch.dtype) -> int:
    """What a save writes when no earlier save of this run tells: per parameter, the fp32 master copy and two Adam
    moments (12 bytes) plus the weights in the model dtype, over the whole model (expert parameters are held
    1/ep_size per rank, so theirs count ep_size times), plus 10% and 64 MiB for DeepSpeed's bookkeeping, the
    tokenizer and the per-rank trainer states."""
    total = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty placeholder in p itself
        total += numel * (ep_size if getattr(p, "allreduce", True) is False else 1)
    per_param = 12 + torch.empty((), dtype=model_dtype).element_size()
    return int(total * per_param * 1.1) + (64 << 20)


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int, rank: int):
        self.output_dir = output_dir
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.rank = rank
        self.last_save_bytes: int | None = None  # total size of this run's previous save (rank 0)

    def remove_stale_temporaries(self) -> None:
        """Saves that were interrupted (rank 0, before training starts)."""
        if self.rank != 0 or not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _last_good(self) -> str:
        last = latest_tag(self.root)
        return f"the last good checkpoint is {os.path.join(self.root, last)}" if last else "no checkpoint exists yet"

    def check_free_space(self, step: int, estimate: Callable[[], int]) -> None:
        """Collective, before a save: raise DiskFull on every rank if the checkpoint root's filesystem has less free
        space than the save needs (this run's previous save's size, else `estimate()`). Rank 0 decides."""
        message = None
        if self.rank == 0:
            needed = self.last_save_bytes if self.last_save_bytes is not None else estimate()
            where = self.root if os.path.isdir(self.root) else self.output_dir
            free = 0 if _fault("disk_full", step) else shutil.disk_usage(where).free
            if free < needed:
                message = (f"step {step}: not enough disk space to save a checkpoint in {self.root}: needs about "
                           f"{needed} bytes, {free} bytes free; stopped before saving, {self._last_good()}; free "
                           "space (or lower train.keep_last) and resume with --resume auto")
        message = _from_rank0(message)
        if message is not None:
            raise DiskFull(message)

    def save(self, step: int, write_engine: Callable[[str, str], None], write_rank_files: Callable[[str], None],
             write_shared_files: Callable[[str], None]) -> str:
        """Collective. `write_engine(root, tmp_tag)` runs on every rank; `write_rank_files(dir)` on every rank;
        `write_shared_files(dir)` on rank 0. Returns the final directory. A write that fails on any rank (one that
        returns to here: a rank dying inside the engine's own collectives stops the job instead) removes the
        temporary directory and raises CheckpointSaveFailed on every rank."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = os.path.join(self.root, tmp_tag), os.path.join(self.root, tag)
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
        _barrier()
        error = None
        try:
            write_engine(self.root, tmp_tag)
            write_rank_files(tmp_dir)
            if self.rank == 0:
                write_shared_files(tmp_dir)
            if _fault("save_error", step):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp_dir, "injected"))
        except Exception as exc:  # noqa: BLE001 - any failure leaves a partial save: reported below, on every rank
            error = f"rank {self.rank}: {exc}"
        errors = [error]
        if _world() > 1:  # also the barrier: every rank's files are written (or failed)
            errors = [None] * _world()
            dist.all_gather_object(errors, error)
        failed = [e for e in errors if e is not None]
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            _barrier()
            raise CheckpointSaveFailed(f"step {step}: writing the checkpoint failed ({failed[0]}); removed the "
                                       f"partial save, {self._last_good()}; resume with --resume auto")
        if self.rank == 0:
            self.last_save_bytes = write_manifest(tmp_dir)  # after every rank's files, before the rename
            if os.path.exists(final_dir):  # same step saved before (e.g. a resumed run re-reaching it): replace
                shutil.rmtree(final_dir)
            os.rename(tmp_dir, final_dir)
            pointer = os.path.join(self.root, "latest")
            with open(pointer + ".tmp", "w") as f:
                f.write(tag)
            os.replace(pointer + ".tmp", pointer)
            # Retention counts this save and older ones only: newer step directories are left by a run that was
            # resumed from further back (a damaged checkpoint passed over) and are replaced as their steps come.
            for old in [t for t in complete_tags(self.root) if t <= tag][:-self.keep_last]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        _barrier()
        return final_dir
