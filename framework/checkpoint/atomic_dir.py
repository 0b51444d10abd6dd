"""Creating an output directory atomically: all of it appears under its final name, or nothing does.

Owns: refusing to replace an existing output unless asked, the temporary sibling directory the work is written into
(`<out>.tmp-<pid>`, same filesystem so the final rename is atomic), and cleaning it up on failure. A run killed hard
(SIGKILL, power loss) leaves only a `.tmp-<pid>` directory, never something that looks like a finished checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


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
    check_output_path(out, overwrite)  # someone may have created it while we worked
    if os.path.lexists(out):
        # Directories cannot be renamed over each other: move the old one aside, so `out` is always either the old
        # checkpoint, absent for an instant, or the new one, never a mix of both.
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
