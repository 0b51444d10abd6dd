"""The error convention shared by the checkpoint command-line tools (tools/moe_merge.py, tools/moe_split.py, ...).

Owns: turning the errors a user can cause (bad paths, bad or inconsistent checkpoints, an existing output, a full
disk) into one line on stderr and exit status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from safetensors import SafetensorError


class UserError(Exception):
    """An error whose message already says what to do; raised by tools for conditions outside the checkpoint code."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, KeyError, SafetensorError)
EXIT_USER_ERROR = 2


def run_cli(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Call `main(argv)`; on a user error print `prog: error: <message>` (its first line) and return 2."""
    try:
        return main(argv)
    except USER_ERRORS as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        message = (message.strip().splitlines() or [type(exc).__name__])[0]  # library messages can run to lines
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
