"""Start N local processes of a worker script with torch.distributed environment variables (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, args: list[str], world: int, timeout: float = 600,
                env: dict[str, str] | None = None) -> None:
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", **(env or {}))
        # Each rank writes to its own file: reading pipes one after another deadlocks once a rank that is not being
        # read fills its pipe (64 KB of warnings) while the one being read waits for it in a collective.
        logs.append(tempfile.TemporaryFile(mode="w+"))
        procs.append(subprocess.Popen([sys.executable, script, *args], env=rank_env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    first_failure = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
            first_failure = now
        # a dead rank leaves its peers waiting in a collective: give them a moment to fail too, then stop them
        if now > deadline or (first_failure is not None and now > first_failure + 10):
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            if first_failure is None:
                raise AssertionError(f"{script} {args}: ranks hung for {timeout} s")
            break
        time.sleep(0.2)
    failed = any(p.returncode != 0 for p in procs)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if failed:
        raise AssertionError(f"{script} {args} failed:\n" + "\n".join(o[-4000:] for o in outputs))
