"""Creating an output directory (or replacing one small file) atomically: all of it appears under its final name, or
nothing does.

Owns: refusing to replace an existing output unless asked, the temporary sibling directory the work is written into
(`<out>.tmp-<pid>`, same filesystem so the final rename is atomic), and cleaning it up on failure. A run killed hard
(SIGKILL, power loss) leaves only a `.tmp-<pid>` directory, never something that looks like a finished checkpoint.

Durability: before the rename every file and directory in the temporary directory is fsynced (files a writer already
synced cost nothing more), and after it the parent directory, so a power loss cannot leave a renamed `out` whose files
are empty or missing: `out` holds either the old content or all of the new.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


def write_text_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` by writing a temporary sibling and renaming it: a reader (or a crash) never sees
    half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_output_path(out: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """The checks `atomic_output_dir` makes before any work, callable on their own to fail fast."""
    real_out = os.path.realpath(out)
    for src in inputs:
        real_src = os.path.realpath(src)
        if real_out == real_src or real_out.startswith(real_src + os.sep) or real_src.startswith(real_out + os.sep):
            raise ValueError(f"output {out} overlaps the input {src}; choose a separate directory")
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
        if not os.path.isdir(out) or os.path.islink(out):
            raise FileExistsError(f"output {out} exists and is not a directory; remove it yourself")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"parent directory of the output does not exist: {parent}")


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
def atomic_output_dir(out: str, overwrite: bool = False, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out`; on a clean exit it becomes `out` (replacing an old one only
    when `overwrite`), on any exception (KeyboardInterrupt included) it is removed."""
    check_output_path(out, overwrite, inputs)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # left by an earlier run that had our pid and was killed
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_tree(tmp)
        check_output_path(out, overwrite)  # someone may have created it while we worked
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
