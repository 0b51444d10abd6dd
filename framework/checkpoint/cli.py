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


def convert_main(argv: list[str] | None, description: str, in_flag: str, in_help: str, out_flag: str,
                 target_layout: str, verb: str) -> int:
    """The command line shared by moe_merge and moe_split: parse, convert to `target_layout`, print one summary line."""
    import argparse  # noqa: PLC0415

    from framework.checkpoint.expert_convert import convert_checkpoint  # noqa: PLC0415

    p = argparse.ArgumentParser(description=description)
    p.add_argument(in_flag, required=True, help=in_help)
    p.add_argument(out_flag, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--max_shard_size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action="store_true", help="re-read the output and compare it with the input")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = vars(p.parse_args(argv))
    src, dst = args[in_flag.lstrip("-")], args[out_flag.lstrip("-")]
    log = None if args["quiet"] else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = convert_checkpoint(src, dst, target_layout, args["max_shard_size"], args["overwrite"], args["verify"], log)
    print(f"{verb} {report.input_layout} -> {report.output_layout}: {report.num_tensors} tensors, "
          f"{format_bytes(report.total_size)} in {report.num_shards} shard(s), {len(report.copied_files)} other "
          f"file(s) copied, {report.seconds:.1f} s{', verified' if report.verified else ''} -> {dst}")
    return 0
