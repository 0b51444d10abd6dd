"""Launching the benchmarks' training runs: DeepSpeed's runner command and one logged, killable subprocess run.

Shared by benchmarks/e2e.py and benchmarks/full_model.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a benchmark started from inside a distributed job must not hand its own rank variables to the runs it launches
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Failure(Exception):
    """A launch or tool that failed (its log is named in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner(num_gpus: int, port: int) -> list[str]:
    """DeepSpeed's runner for num_gpus processes on this host (CUDA, or CPU processes on gloo without it)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port", str(port)]


def _raise_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def run_logged(cmd: list[str], log: str, timeout: float | None = None, env: dict[str, str] | None = None) -> str:
    """Run cmd from the repo root with its output in `log` (returned); raise Failure on a nonzero status or timeout.
    `env` adds to (or overrides) this process's environment."""
    full_env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    start = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # A SIGTERM (`timeout`, a scheduler) would end this process at once and leave the run's own process group
        # holding the GPU for whatever is launched next; as an exception it reaches the kill below.
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        # its own process group, so that a timeout (or Ctrl-C) stops the runner's rank processes too
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            rc = f"timeout after {timeout:g} s"
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(f"[{time.time() - start:6.1f} s] rc={rc} {os.path.basename(log)}: {' '.join(cmd[-4:])[-140:]}", flush=True)
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise Failure(f"{os.path.basename(log)} failed (rc={rc}); log {log}:\n{tail}")
    return log
