"""Rows read from V data streams, resumable: the bookkeeping packed pretraining rows and packed chat rows share.

Owns: which stream and row a global sample is (sample g is row g // V of stream g % V), moving a stream forward over
rows another rank trains on, and the saved position of each stream (`positions` / `seek`). A subclass says how a
stream is made, moved to a saved position and read one row at a time.
"""

from __future__ import annotations

from typing import Any


def rows_before(next_sample: int, v: int, num_streams: int) -> int:
    """How many rows of stream v the samples 0 .. next_sample - 1 use."""
    return max(0, (next_sample - v + num_streams - 1) // num_streams)


class StreamRows:
    """Base of PackedRows (framework/data/samples.py) and ChatRows (chat_rows.py)."""

    num_streams: int

    def __init__(self, num_streams: int):
        self.num_streams = num_streams
        self._streams: dict[int, Any] = {}
        self._next_row: dict[int, int] = {}
        self._pending: dict[int, list[int]] = {}  # saved positions of streams not read since the resume

    # what a subclass provides
    def _new_stream(self, v: int) -> Any:
        raise NotImplementedError

    def _seek_stream(self, stream: Any, position: list[int]) -> None:
        """Move a new stream to a saved position (the entries after the row number)."""
        raise NotImplementedError

    def _read_row(self, stream: Any) -> Any:
        """The stream's next row (what `row` returns)."""
        raise NotImplementedError

    def _skip_row(self, stream: Any) -> None:
        """Move past the stream's next row without building it (a row another rank trains on)."""
        self._read_row(stream)

    def _stream(self, v: int) -> Any:
        stream = self._streams.get(v)
        if stream is None:
            stream = self._new_stream(v)
            self._next_row[v] = 0
            if v in self._pending:  # seek on first use: a rank touches only its own streams when V = B
                row, *position = self._pending.pop(v)
                self._seek_stream(stream, position)
                self._next_row[v] = row
            self._streams[v] = stream
        return stream

    def row(self, g: int) -> Any:
        v, j = g % self.num_streams, g // self.num_streams
        stream = self._stream(v)
        if self._next_row[v] > j:
            raise RuntimeError(f"data stream {v}: row {j} requested after row {self._next_row[v] - 1}")
        while self._next_row[v] < j:  # a row of a shared stream that another rank trains on
            self._skip_row(stream)
            self._next_row[v] += 1
        self._next_row[v] += 1
        return self._read_row(stream)

    def positions(self, next_sample: int) -> dict[int, list[int]]:
        """{stream: [next row, *the stream's position]} for the streams this rank holds exactly at the row that
        follows sample `next_sample - 1`."""
        out = {v: list(pos) for v, pos in self._pending.items()
               if pos[0] == rows_before(next_sample, v, self.num_streams)}
        for v, stream in self._streams.items():
            if self._next_row[v] == rows_before(next_sample, v, self.num_streams):
                out[v] = [self._next_row[v], *stream.position()]
        return out

    def seek(self, positions: dict[int, list[int]]) -> None:
        """Positions from a checkpoint; each stream moves there when first read."""
        self._streams, self._next_row = {}, {}
        self._pending = {v: list(pos) for v, pos in positions.items()}
