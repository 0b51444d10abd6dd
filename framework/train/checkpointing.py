"""Where training checkpoints live and how they become complete: atomic saves, `latest`, keep-last-K, resume lookup.

Layout: OUTPUT_DIR/checkpoints/step_00000100/ (engine state from framework/zero/checkpoint_io.py, the HF config.json,
the tokenizer, run_config.yaml, and one trainer_state_rank{R}.pt per rank: data position + RNG states),
OUTPUT_DIR/checkpoints/latest (the newest complete tag). A save is written under a dot-prefixed temporary name and
renamed once every rank has finished, and `latest` is replaced atomically after that: a process killed at any moment
leaves the previous checkpoint as the one `--resume auto` finds. Checkpoints must be on a filesystem all nodes see.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d{8})$")
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


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isdir(os.path.join(root, t)))


def latest_tag(root: str) -> str | None:
    """The newest complete tag under `root`. `latest` names it normally; a kill between the rename and the pointer
    update leaves a newer complete checkpoint than `latest` says, and both are complete, so the newer one wins."""
    tags = complete_tags(root)
    try:
        with open(os.path.join(root, "latest")) as f:
            named = f.read().strip()
    except FileNotFoundError:
        named = None
    if named in tags and named == tags[-1]:
        return named
    return tags[-1] if tags else None


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int, rank: int):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.rank = rank

    def resolve(self, resume: str | None) -> tuple[str, str] | None:
        """(checkpoint root, tag) to resume from: None for a fresh run; "auto": the newest complete checkpoint in
        OUTPUT_DIR if any; a path: that tag directory or a checkpoint root with `latest`."""
        if resume is None:
            return None
        if resume == "auto":
            tag = latest_tag(self.root)
            return (self.root, tag) if tag else None
        path = os.path.abspath(resume)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"train.resume: {resume} is not a directory; give a checkpoint (…/step_N) or "
                                    "'auto'")
        if os.path.exists(os.path.join(path, "meta.json")):
            return os.path.dirname(path), os.path.basename(path)
        found = latest_tag(path)
        if found is None:
            raise FileNotFoundError(f"train.resume: {resume} holds no complete checkpoint (no step_N directory with "
                                    "meta.json)")
        return path, found

    def remove_stale_temporaries(self) -> None:
        """Saves that were interrupted (rank 0, before training starts)."""
        if self.rank != 0 or not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def save(self, step: int, write_engine: Callable[[str, str], None], write_rank_files: Callable[[str], None],
             write_shared_files: Callable[[str], None]) -> str:
        """Collective. `write_engine(root, tmp_tag)` runs on every rank; `write_rank_files(dir)` on every rank;
        `write_shared_files(dir)` on rank 0. Returns the final directory."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = os.path.join(self.root, tmp_tag), os.path.join(self.root, tag)
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
        _barrier()
        write_engine(self.root, tmp_tag)
        write_rank_files(tmp_dir)
        if self.rank == 0:
            write_shared_files(tmp_dir)
        _barrier()  # every rank's files are written
        if self.rank == 0:
            if os.path.exists(final_dir):  # same step saved before (e.g. a resumed run re-reaching it): replace
                shutil.rmtree(final_dir)
            os.rename(tmp_dir, final_dir)
            pointer = os.path.join(self.root, "latest")
            with open(pointer + ".tmp", "w") as f:
                f.write(tag)
            os.replace(pointer + ".tmp", pointer)
            for old in complete_tags(self.root)[:-self.keep_last]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        _barrier()
        return final_dir
