"""Creating an output directory (or replacing one small file) atomically: all of it appears under its final name, or
nothing does.

Owns: refusing to replace an existing output unless asked, the temporary sibling directory the work is written into
(`<out>.tmp-<pid>`, same filesystem so the final rename is atomic), and cleaning it up on failure. A run killed hard
(SIGKILL, power loss) leaves only a `.tmp-<pid>` directory, never something that looks like a finished checkpoint.

Stale temporary directories: each one holds a small owner record (`OWNER_FILE`: host, pid, process start time),
removed just before the final rename. A run that starts writing `out` removes the `<out>.tmp-<pid>` siblings whose
process is gone from this host (one note on stderr each), and refuses to start, naming the directory, while one belongs
to a live process, to another host (on a shared filesystem we cannot see its processes), or has no readable record.

Durability: before the rename every file and directory in the temporary directory is fsynced (files a writer already
synced cost nothing more), and after it the parent directory, so a power loss cannot leave a renamed `out` whose files
are empty or missing: `out` holds either the old content or all of the new.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

OWNER_FILE = ".atomic_dir_owner.json"
_TMP_RE = re.compile(r"\.tmp-(\d+)$")


def write_text_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` by writing a temporary sibling and renaming it: a reader (or a crash) never sees
    half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_output_path(out: str, overwrite: bool, inputs: tuple[str, ...] = (), temp_dirs: bool = True) -> None:
    """The checks `atomic_output_dir` makes before any work, callable on their own to fail fast; `temp_dirs` includes
    `check_temp_dirs`."""
    real_out = os.path.realpath(out)
    for src in inputs:
        real_src = os.path.realpath(src)
        if real_out == real_src or real_out.startswith(real_src + os.sep) or real_src.startswith(real_out + os.sep):
            raise ValueError(f"output {out} overlaps the input {src}; choose a separate directory")
    if temp_dirs:
        check_temp_dirs(out)
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
        if not os.path.isdir(out) or os.path.islink(out):
            raise FileExistsError(f"output {out} exists and is not a directory; remove it yourself")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"parent directory of the output does not exist: {parent}")


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), which tells a reused pid from the one recorded."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


def _write_owner(tmp: str) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}
    with open(os.path.join(tmp, OWNER_FILE), "w") as f:
        json.dump(owner, f)


def _read_owner(tmp: str) -> dict | None:
    try:
        with open(os.path.join(tmp, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _sibling_temp_dirs(out: str) -> list[str]:
    """`<out>.tmp-<pid>` directories of other processes than this one."""
    parent, base = os.path.split(os.path.abspath(out))
    found = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name)
        m = _TMP_RE.search(name)
        if (m and name[:m.start()] == base and int(m[1]) != os.getpid() and os.path.isdir(path)
                and not os.path.islink(path)):
            found.append(path)
    return found


def _why_kept(tmp: str, out: str) -> str | None:
    """None when `tmp` was left by a process of this host that is gone; otherwise why it must stay."""
    owner = _read_owner(tmp)
    if owner is None:
        return f"{tmp} has no readable owner record ({OWNER_FILE}); remove it if no run is writing {out}"
    pid, host = owner["pid"], owner.get("host")
    if host != socket.gethostname():
        return (f"{tmp} belongs to pid {pid} on host {host}, which cannot be checked from here; remove it if no run "
                f"on {host} is writing {out}")
    if _alive(pid, owner.get("started")):
        return f"{tmp} is being written by pid {pid} on this host; wait for it to finish or stop it"
    return None


def check_temp_dirs(out: str) -> None:
    """Refuse to start while another run's temporary directory for `out` may still be in use (see the docstring)."""
    for tmp in _sibling_temp_dirs(out):
        reason = _why_kept(tmp, out)
        if reason:
            raise FileExistsError(f"output {out}: {reason}")


def remove_stale_temp_dirs(out: str, note: Callable[[str], None] | None = None) -> list[str]:
    """Remove the temporary directories for `out` left by dead processes of this host; returns their paths."""
    note = note or (lambda msg: print(msg, file=sys.stderr, flush=True))
    removed = []
    for tmp in _sibling_temp_dirs(out):
        if _why_kept(tmp, out) is None:
            shutil.rmtree(tmp)
            note(f"note: removed {tmp}, left by a run that died (pid {_TMP_RE.search(tmp)[1]} on this host)")
            removed.append(tmp)
    return removed


def fsync_tree(root: str) -> None:
    """fsync every regular file and directory under `root` (directories last, deepest first)."""
    dirs = []
    for current, _, files in os.walk(root):
        dirs.append(current)
        for name in files:
            path = os.path.join(current, name)
            if os.path.isfile(path) and not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
    for current in reversed(dirs):
        _fsync(current, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


@contextmanager
def atomic_output_dir(out: str, overwrite: bool = False, inputs: tuple[str, ...] = (),
                      note: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out`; on a clean exit it becomes `out` (replacing an old one only
    when `overwrite`), on any exception (KeyboardInterrupt included) it is removed. Temporary directories of `out`
    left by dead runs are removed first, each with a line to `note` (default: stderr)."""
    check_output_path(out, overwrite, inputs)
    out = os.path.abspath(out)
    remove_stale_temp_dirs(out, note)
    tmp = f"{out}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # left by an earlier run that had our pid and was killed
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        _write_owner(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_tree(tmp)
        # Last, so that a run killed any earlier leaves a record; the output itself must not carry it.
        os.unlink(os.path.join(tmp, OWNER_FILE))
        fsync_dir(tmp)
        # Someone may have created `out` while we worked. A run that started meanwhile is not a reason to fail now:
        # it saw our live directory and stopped, or it started at the same instant and the last rename wins.
        check_output_path(out, overwrite, temp_dirs=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parent = os.path.dirname(out)
    if os.path.lexists(out):
        # Directories cannot be renamed over each other: move the old one aside, so `out` is always either the old
        # checkpoint, absent for an instant, or the new one, never a mix of both.
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
        fsync_dir(parent)
