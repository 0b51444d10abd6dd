"""Start N local processes of a worker script with torch.distributed environment variables (gloo on CPU).

Also a launcher for tests whose subject is what the ranks compute, not how they were started:

    python tests/distributed/launch.py N MASTER_PORT SCRIPT [ARGS ...]

starts N ranks of SCRIPT as DeepSpeed's launcher does on one host (`python -u SCRIPT --local_rank=R ARGS` with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) and exits with the first failing rank's status after
stopping the others. It imports neither torch nor deepspeed: `python -m deepspeed.launcher.runner` imports deepspeed
twice (the runner, then deepspeed.launcher.launch) before any rank starts, ~5 s of a tiny 2-process run's ~12 s.
Tests of the launch path itself (test_multinode.py, test_user_errors.py, the README's `deepspeed` commands) keep
DeepSpeed's runner.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

LAUNCHER = os.path.abspath(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env_of(rank: int, world: int, port: int | str) -> dict[str, str]:
    """This process's environment plus what torch.distributed reads for `rank` of `world` ranks on this host."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def run_workers(script: str, args: list[str], world: int, timeout: float = 600,
                env: dict[str, str] | None = None) -> None:
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        rank_env = dict(rank_env_of(rank, world, port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                        CUDA_VISIBLE_DEVICES="", **(env or {}))
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


def join_runs(runs: list[list[str]]) -> list[str]:
    """One command line for the runs of a worker that takes several, '+' between them (`split_runs` reads it back):
    each run of one launch saves a launch's start-up (~5 s on a 2-core CPU machine)."""
    return [arg for i, run in enumerate(runs) for arg in ["+"] * (i > 0) + run]


def split_runs(argv: list[str]) -> list[list[str]]:
    """The '+'-separated runs of a worker's command line (`join_runs`' inverse)."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "+":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def local_launcher(world: int, port: int | None = None) -> list[str]:
    """The command prefix that starts `world` ranks of the script that follows it (see the module docstring)."""
    return [sys.executable, LAUNCHER, str(world), str(port or free_port())]


def _exit_status(status: int) -> int:
    """A shell's exit status for a child's wait status (a signal's death: 128 + the signal)."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _launch(world: int, port: str, script: str, args: list[str]) -> int:
    procs = {}
    for rank in range(world):
        proc = subprocess.Popen([sys.executable, "-u", script, f"--local_rank={rank}", *args],
                                env=rank_env_of(rank, world, port))
        procs[proc.pid] = proc

    def stop(signum=signal.SIGTERM, _frame=None) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGALRM, lambda *_: stop(signal.SIGKILL))  # a rank that ignores SIGTERM
    code = 0
    while procs:
        pid, status = os.wait()  # blocks until a rank ends: no polling delay after the last one
        proc = procs.pop(pid, None)
        if proc is None:
            continue
        proc.returncode = _exit_status(status)
        if proc.returncode and not code:  # a dead rank leaves its peers waiting in a collective
            code = proc.returncode
            stop()
            signal.alarm(30)
    return code


if __name__ == "__main__":
    sys.exit(_launch(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
