"""What a checkpointed region's recomputation may take from its first run instead of working it out again.

`checkpoint_contexts` is torch.utils.checkpoint's `context_fn` for every checkpoint the decoder makes: the region's
first run records, its recomputation in the backward replays. Code inside the region asks `replay()`: while
recording, `replay().record(value)` keeps a value; while recomputing, `replay().take()` returns the kept values in
the same order. A recomputation sees the same inputs and weights, so anything derived from them is the same; only
values that cost a device-to-host sync or a collective are worth keeping (the expert-parallel count exchange,
framework/parallel/ep_dispatch.py).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any


class Replay:
    def __init__(self):
        self.values: list[Any] = []
        self.replaying = False
        self._next = 0

    def record(self, value: Any) -> None:
        if not self.replaying:
            self.values.append(value)

    def take(self) -> Any | None:
        """The next recorded value while recomputing (None when not recomputing or nothing is left)."""
        if not self.replaying or self._next >= len(self.values):
            return None
        self._next += 1
        return self.values[self._next - 1]


_CURRENT: contextvars.ContextVar[Replay | None] = contextvars.ContextVar("recompute_replay", default=None)


@contextlib.contextmanager
def _active(replay: Replay, replaying: bool):
    replay.replaying, replay._next = replaying, 0
    token = _CURRENT.set(replay)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's context_fn: (first run: record, recomputation: replay), one Replay per region."""
    replay = Replay()
    return _active(replay, False), _active(replay, True)


def replay() -> Replay | None:
    """The innermost checkpointed region's Replay; None outside checkpointed regions."""
    return _CURRENT.get()
