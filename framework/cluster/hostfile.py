"""Reading a DeepSpeed hostfile with errors that name the file, the line and the text.

Owns: the hostfile grammar and its one-line errors. Does not own world-size arithmetic (world.py) or the launch
(prelaunch.py).

The grammar is the one DeepSpeed 0.19.8's runner accepts (`deepspeed/launcher/runner.py`, `_parse_hostfile`): one
`HOST slots=N` per line, leading and trailing whitespace ignored, lines that are blank or start with `#` skipped, any
text after `slots=N` ignored (so MPI-style `max_slots=...` and trailing `# comments` pass), hosts kept in file order
(rank order). Where DeepSpeed is lax we are strict, because each case launches something the user did not mean:

- a missing hostfile: DeepSpeed warns and trains on this machine's GPUs only;
- `slots=0`, or `slots=8x` (read as 8): DeepSpeed takes them;
- a file with no hosts, a bad line or a duplicate host: DeepSpeed raises too, but without the line number.
"""

from __future__ import annotations

import re

EXPECTED = "expected 'HOST slots=N' (e.g. 'worker-0 slots=8')"
_COUNT = re.compile(r"[0-9]+")


class HostPool(dict):
    """Ordered `host -> slots` as read from a hostfile, remembering where each host came from.

    A plain dict to every caller (the same mapping DeepSpeed's runner builds); `line_of[host]` is the 1-based line and
    `text_of[host]` the stripped text of that line, so later checks (world.py) can name them.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.line_of: dict[str, int] = {}
        self.text_of: dict[str, str] = {}


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: hostfile not found (DeepSpeed would warn and start on this machine's "
                                f"GPUs only); check the --hostfile path") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a hostfile; {EXPECTED} on each line") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; {EXPECTED} on each line") from None


def _parse_line(line: str, where: str) -> tuple[str, int]:
    """`line` is stripped, non-empty and not a comment; returns (host, slots)."""
    fields = line.split()
    if len(fields) < 2 or not fields[1].startswith("slots="):
        raise ValueError(f"{where}: bad hostfile line {line!r}: {EXPECTED}")
    value = fields[1][len("slots="):]
    if not _COUNT.fullmatch(value) or int(value) < 1:
        raise ValueError(f"{where}: slots must be a positive integer, found {fields[1]!r} in {line!r}")
    return fields[0], int(value)


def parse_hostfile(path: str) -> HostPool:
    """Read `path` into an ordered `host -> slots` mapping (a `HostPool`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a bad line, slots that are not a positive integer, a host listed twice, or no hosts at all;
            the message is one line naming `path:LINE` and the offending text.
    """
    pool = HostPool(path)
    for lineno, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        host, slots = _parse_line(line, where)
        if host in pool:
            first = pool.line_of[host]
            raise ValueError(f"{where}: host {host!r} is listed twice ({line!r}; first on line {first}: "
                             f"{pool.text_of[host]!r}); give each host one line")
        pool[host] = slots
        pool.line_of[host] = lineno
        pool.text_of[host] = line
    if not pool:
        raise ValueError(f"{path}: hostfile lists no hosts (only blank or comment lines); {EXPECTED} on each line")
    return pool
