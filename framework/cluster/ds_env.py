"""Checking the `.deepspeed_env` files that DeepSpeed's runner exports to every node of a multi-node launch.

Owns: finding those files the way DeepSpeed 0.19.8 does and rejecting lines it would mishandle. The runner
(`deepspeed/launcher/runner.py`, multi-node branch only) reads `$HOME/NAME` and then `./NAME` (NAME is `$DS_ENV_FILE`,
default `.deepspeed_env`; the second wins for a key set in both) and splits *every* line at its first `=`: it skips no
comments and no blank lines. A blank line crashes the runner with a bare "not enough values to unpack"; a comment
holding `=` becomes `export # ...=...;` at the front of the pdsh command line, where the shell's `#` swallows the
rest of it. launch/deepspeed_env.example carries comments, so it is filtered before use (launch/MULTINODE.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

DEFAULT_NAME = ".deepspeed_env"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRIP_HINT = "keep only KEY=VALUE lines, e.g. grep -Ev '^[[:space:]]*(#|$)' FILE > .deepspeed_env"


def deepspeed_env_files(environ: Mapping[str, str] | None = None, cwd: str = ".") -> list[str]:
    """The files DeepSpeed's runner would read, in its order (home first, then the current directory)."""
    environ = os.environ if environ is None else environ
    name = environ.get("DS_ENV_FILE", DEFAULT_NAME)
    home = environ.get("HOME") or os.path.expanduser("~")
    found = []
    for folder in (home, cwd):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def check_deepspeed_env(path: str) -> dict[str, str]:
    """Return the `KEY -> VALUE` pairs of one `.deepspeed_env` file, as the runner will export them.

    Raises:
        ValueError: a line the runner cannot read as `KEY=VALUE` (blank, comment, no `=`, or a key that is not a
            variable name); one line naming `path:LINE` and the text.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()  # as the runner reads it: a final line without a newline is still a line
    exports = {}
    for lineno, line in enumerate(lines, start=1):
        text = line.rstrip("\n")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{lineno}: DeepSpeed's runner reads every line as KEY=VALUE (it skips no blank or "
                             f"comment lines), found {text!r}; {_STRIP_HINT}")
        if not _NAME.fullmatch(key.strip()):
            raise ValueError(f"{path}:{lineno}: {key.strip()!r} is not an environment variable name in {text!r}; "
                             f"{_STRIP_HINT}")
        exports[key.strip()] = value.strip()
    return exports
