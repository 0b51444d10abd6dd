"""Starting torch.distributed through DeepSpeed, and not leaking DeepSpeed's CPU shared-memory workspace.

On a CPU (gloo) world whose ranks all sit on one host, `deepspeed.init_distributed` builds DeepSpeed's ShareMemComm op
(deepspeed/ops/csrc/cpu/comm/shm.cpp), which creates one ~69 MB POSIX shared-memory object per rank,
`deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`, and never unlinks it: every finished run left
its buffers in the RAM-backed /dev/shm until the host ran out of memory. Each rank maps all its peers' buffers before
init_distributed returns, so once every rank is past it (a barrier) each rank unlinks its own name: the mappings stay
valid and the kernel frees the memory when the last process exits, however it exits. Only DeepSpeed's
inference_all_reduce uses the op; training never does.
"""

from __future__ import annotations

import os

import torch.distributed as dist

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects
SHM_PREFIX = "deepspeed_allreduce_buffer"


def init_deepspeed_distributed(backend: str) -> None:
    """deepspeed.init_distributed(backend), then release this rank's shared-memory workspace name (gloo only)."""
    import deepspeed  # noqa: PLC0415 - slow import; only distributed code needs it

    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        release_allreduce_workspace()


def allreduce_workspace_path(rank: int) -> str:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_allreduce_workspace() -> None:
    """Unlink this rank's DeepSpeed shm workspace once every rank has mapped it (collective on the default group)."""
    dist.barrier()  # every peer has opened this rank's buffer: shm_initialize maps them all before returning
    try:
        os.unlink(allreduce_workspace_path(dist.get_rank()))
    except FileNotFoundError:
        pass  # the op was not built or not initialised (ranks on several hosts): nothing was created
