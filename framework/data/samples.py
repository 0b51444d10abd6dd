"""Training batches as a function of the global sample index: the same sequences at the same step on any world size.

Owns: which sequence is global sample g, which samples each rank's micro-batches hold, and the resumable position.

- Sample g is row g // V of data stream g % V. A stream is an endless packed-token stream over its share of the
  documents (stream v reads positions v, v+V, ... of each epoch's document order; framework/data/stream.py). V, the
  number of streams, is fixed when a run starts (the global batch size, or the document count if smaller) and kept
  across resumes, so the order never depends on the number of processes.
- Optimizer step s (0-based, from sample offset S0) trains on samples S0 + s*B .. S0 + (s+1)*B - 1, B the global
  batch. Micro-batch k of rank r holds the `micro_batch_size` consecutive samples starting at
  ((k * W + r) * micro_batch_size): the groups of samples that form micro-batches are the same for every world size W
  with the same micro_batch_size, so per-micro-batch means (the loss, the router's balance statistics) are too;
  fewer processes make up the difference with gradient accumulation.
- With V = B, every stream is read by exactly one rank. Any other layout (a global batch changed on resume, a tiny
  corpus) is still exact: a rank passes over the rows of a stream it shares without using them (tokenising them).

The position saved with a checkpoint is global (`global_state`): the next sample and, per stream, where its next row
starts. Each rank reports the streams it has read up to the checkpoint (`local_positions`); any rank that read a
stream's last row before the checkpoint holds its position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from framework.data.packing import make_batch, pack_row
from framework.data.sources import Corpus
from framework.data.stream import DocumentStream
from framework.data.stream_rows import StreamRows, rows_before

if TYPE_CHECKING:
    from framework.data.chat_rows import ChatRows

STATE_FORMAT = 2
MEMO_TOKENS = 1 << 24  # tokenised documents kept in memory, over all streams of a rank


def default_num_streams(global_batch_size: int, num_docs: int) -> int:
    return max(1, min(global_batch_size, num_docs))


class PackedRows(StreamRows):
    """Rows of `seq_len` tokens from `num_streams` packed document streams."""

    kind = "packed"

    def __init__(self, corpus: Corpus, encode: Callable, seq_len: int, num_streams: int, seed: int, shuffle: bool):
        if num_streams > corpus.num_docs:
            raise ValueError(f"the corpus has {corpus.num_docs} documents, fewer than the {num_streams} data streams "
                             "of this run; add data")
        super().__init__(num_streams)
        self.corpus, self.encode, self.seq_len = corpus, encode, seq_len
        self.seed, self.shuffle = seed, shuffle

    def identity(self) -> dict:
        return {"num_streams": self.num_streams, "seed": self.seed, "shuffle": self.shuffle,
                "num_docs": self.corpus.num_docs}

    def _new_stream(self, v: int) -> DocumentStream:
        return DocumentStream(self.corpus, self.encode, seed=self.seed, shuffle=self.shuffle, dp_rank=v,
                              dp_world=self.num_streams, memo_tokens=MEMO_TOKENS // self.num_streams)

    def _seek_stream(self, stream: DocumentStream, position: list[int]) -> None:
        epoch, doc_index, token_offset = position
        stream.seek(epoch, doc_index, token_offset)

    def _read_row(self, stream: DocumentStream) -> tuple[np.ndarray, np.ndarray]:
        return pack_row(stream.take(self.seq_len), self.seq_len)

    def _skip_row(self, stream: DocumentStream) -> None:
        stream.take(self.seq_len)


class RandomRows:
    """data.synthetic, for throughput runs (Megatron's --mock-data): uniform random token ids, one document per row,
    so the router sees tokens with no structure and spreads them evenly, the condition stock benchmarks (and our
    anchors) measure under; real text routes unevenly at initialisation, which costs EP waiting time: benchmark both.
    Row g is a pure function of (seed, g)."""

    kind = "random"

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def identity(self) -> dict:
        return {"seed": self.seed}

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=gen).numpy()
        return ids, np.arange(self.seq_len, dtype=np.int64)

    def positions(self, next_sample: int) -> dict[int, list[int]]:
        return {}

    def seek(self, positions: dict[int, list[int]]) -> None:
        pass


class StepBatchLoader:
    """This rank's micro-batches, `gradient_accumulation` of them per optimizer step, in step order.

    Yields dicts of int64 CPU tensors [micro_batch_size, seq_len]: input_ids, labels, position_ids (packing.py's
    row layout; random rows predict every token; chat rows (framework/data/chat_rows.py) bring their own labels).
    """

    def __init__(self, rows: PackedRows | RandomRows | ChatRows, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_world: int, next_sample: int = 0):
        per_step = micro_batch_size * dp_world
        if global_batch_size % per_step:
            raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} "
                             f"x {dp_world} ranks")
        self.rows = rows
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.gas = global_batch_size // per_step
        self.next_sample = next_sample  # the first sample of the current step
        self._micro = 0  # micro-batches of the current step already handed out

    def __iter__(self) -> StepBatchLoader:
        return self

    def micro_batch_samples(self, k: int) -> list[int]:
        first = self.next_sample + (k * self.dp_world + self.dp_rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def __next__(self) -> dict[str, torch.Tensor]:
        samples = self.micro_batch_samples(self._micro)
        self._micro += 1
        if self._micro == self.gas:
            self._micro = 0
            self.next_sample += self.global_batch_size
        rows = [self.rows.row(g) for g in samples]
        if isinstance(self.rows, RandomRows):
            ids = torch.from_numpy(np.stack([r[0] for r in rows]))
            pos = torch.from_numpy(np.stack([r[1] for r in rows]))
            return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
        return make_batch(rows)

    # -- resumable position

    def local_positions(self) -> dict[int, list[int]]:
        """This rank's part of the global state, at a step boundary (gather it from every rank)."""
        if self._micro:
            raise RuntimeError("data position asked for in the middle of an optimizer step")
        return self.rows.positions(self.next_sample)

    def global_state(self, gathered: list[dict[int, list[int]]]) -> dict:
        """The JSON-serialisable position of the whole run from every rank's `local_positions()`."""
        streams: dict[str, list[int]] = {}
        for positions in gathered:
            for v, pos in positions.items():
                if str(v) in streams and streams[str(v)] != pos:
                    raise RuntimeError(f"data stream {v}: ranks disagree on its position ({streams[str(v)]} vs {pos})")
                streams[str(v)] = pos
        return {"format": STATE_FORMAT, "kind": self.rows.kind, **self.rows.identity(),
                "next_sample": self.next_sample, "global_batch_size": self.global_batch_size, "streams": streams}

    def load_state(self, state: dict) -> None:
        """Continue from `global_state()`'s output (any world size; another global batch continues from the same
        sample). Raises ValueError naming what differs when the state belongs to other data."""
        if state.get("format") != STATE_FORMAT or state.get("kind") != self.rows.kind:
            raise ValueError(f"data position has format {state.get('format')!r} / kind {state.get('kind')!r}; this "
                             f"run reads format {STATE_FORMAT} / {self.rows.kind!r} (checkpoints written before the "
                             "world-size-independent data order, or with other data.synthetic, cannot continue the "
                             "data; start a new run from tools/ds_to_hf.py's export)")
        mine = self.rows.identity()
        diffs = [f"{k} {state.get(k)!r} != {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ValueError(f"data position does not match this run's data (saved vs now: {'; '.join(diffs)})")
        self.next_sample, self._micro = int(state["next_sample"]), 0
        num_streams = mine.get("num_streams", 0)
        positions = {int(v): pos for v, pos in state["streams"].items() if int(v) < num_streams}
        # streams never read before the checkpoint start at their beginning; others must be in the state
        for v in range(min(num_streams, self.next_sample)):
            if rows_before(self.next_sample, v, num_streams) and v not in positions:
                raise ValueError(f"data position lacks stream {v} (a damaged data_state.json?)")
        self.rows.seek(positions)


def packed_rows(corpus: Corpus, tokenizer, seq_len: int, num_streams: int, seed: int, shuffle: bool) -> PackedRows:
    from framework.data.tokenizer import check_eos, encode_documents  # noqa: PLC0415

    encode = functools.partial(encode_documents, tokenizer, eos_id=check_eos(tokenizer))
    return PackedRows(corpus, encode, seq_len, num_streams, seed, shuffle)
