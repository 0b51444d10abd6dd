"""One run per output directory: an exclusive lock on OUTPUT_DIR/.run.lock held by global rank 0 for the life of
the run.

flock, not a pid file: the kernel drops the lock when the process dies however it dies (SIGKILL, OOM, node reboot),
so a crash never leaves a stale lock for the next run to argue with. The file's text (host and pid) is only there to
name the holder in the refusal; it is not what decides. On NFS (v4, or v3 with lockd) Linux maps flock onto
byte-range locks that all clients see; Lustre needs the `flock` mount option, without which flock fails (ENOSYS,
reported) rather than silently locking nothing.
"""

from __future__ import annotations

import fcntl
import os
import socket

LOCK_NAME = ".run.lock"
_held: dict[str, RunLock] = {}  # realpath of the output dir -> this process's lock (taking it twice is a no-op)


class RunLock:
    def __init__(self, path: str, fd: int, created_file: bool, created_dir: bool):
        self.path = path
        self._fd: int | None = fd
        self._created = (created_file, created_dir)  # what taking the lock wrote, for release(discard=True)

    def release(self, discard: bool = False) -> None:
        """discard: the run stopped before writing anything (a refused config): also remove the lock file and the
        output directory if taking the lock created them, so that bad input leaves nothing behind."""
        if self._fd is None:
            return
        _held.pop(os.path.realpath(os.path.dirname(self.path)), None)
        created_file, created_dir = self._created
        if discard and created_file:
            os.unlink(self.path)  # while still held: no other run can have taken this file's lock meanwhile
        os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None
        if discard and created_dir:
            try:
                os.rmdir(os.path.dirname(self.path))  # only if empty
            except OSError:
                pass


def acquire_run_lock(output_dir: str) -> RunLock:
    """Take OUTPUT_DIR's run lock for this process (creating the directory), or raise FileExistsError naming the host
    and pid of the run that holds it. Call it on global rank 0 only, before anything is written into OUTPUT_DIR."""
    key = os.path.realpath(output_dir)
    if key in _held:
        return _held[key]
    created_dir = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    created_file = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise FileExistsError(f"train.output_dir {output_dir} is in use by another run ({holder or 'holder unknown'}"
                              f", lock {path}); wait for it to end, or choose another train.output_dir") from None
    except OSError as exc:
        os.close(fd)
        raise OSError(f"cannot lock {path} ({exc.strerror}); the filesystem of train.output_dir must support flock "
                      "(Lustre: mount with -o flock)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    lock = _held[key] = RunLock(path, fd, created_file, created_dir)
    return lock
