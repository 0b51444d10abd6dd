"""Packed rows of whole conversations for `StepBatchLoader` (framework/data/samples.py): the row protocol of
`PackedRows` (`row(g)`, `positions`, `seek`, `identity`), with labels.

Owns: which conversations are trained on at this seq_len (one longer than `seq_len` is truncated from the end, or
dropped with `overlong="drop"`; one whose assistant tokens all lie past `seq_len` is dropped either way), and how a
stream of conversations becomes rows: whole conversations one after another while they fit, the rest of the row
padded. Position ids restart at 0 for every conversation (and for the padding), so attention stays inside each
conversation (the model's varlen / block-diagonal mask) and no label crosses a boundary: every conversation's first
token is unlabelled, and padding has no labels.

Streams: as for pretraining, sample g is row g // V of stream g % V, and stream v reads positions v, v+V, ... of each
epoch's conversation order (framework/data/order.py), so the batches do not depend on the number of processes. A
stream's position is (next row, epoch, index in its list, 0): rows always start at a conversation boundary.
"""

from __future__ import annotations

import numpy as np

from framework.data.chat_dataset import ChatData
from framework.data.chat_template import IGNORE_INDEX
from framework.data.order import docs_per_rank, rank_documents
from framework.data.stream_rows import StreamRows


class ConversationStream:
    """Stream v of V: its conversations (indices into `eligible`) epoch after epoch, cut into rows."""

    def __init__(self, rows: "ChatRows", v: int):
        self.rows, self.v = rows, v
        self.per_epoch = docs_per_rank(len(rows.eligible), v, rows.num_streams)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.index, 0

    def seek(self, epoch: int, index: int) -> None:
        if epoch < 0 or not 0 <= index < self.per_epoch:
            raise ValueError(f"data position epoch={epoch}, index={index} is outside stream {self.v}'s "
                             f"{self.per_epoch} conversations per epoch; was the data or data.seq_len changed?")
        self.epoch, self.index = epoch, index

    def _peek(self) -> int:
        if self._order_epoch != self.epoch:
            self._order = rank_documents(len(self.rows.eligible), self.rows.seed, self.epoch, self.rows.shuffle,
                                         self.v, self.rows.num_streams)
            self._order_epoch = self.epoch
        return int(self.rows.eligible[self._order[self.index]])

    def _advance(self) -> None:
        self.index += 1
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0

    def next_row(self) -> list[int]:
        """The conversations of the next row: the first always, then more while the row has room."""
        lengths, seq_len = self.rows.lengths, self.rows.seq_len
        taken = [self._peek()]
        self._advance()
        used = min(int(lengths[taken[0]]), seq_len)
        while used + int(lengths[self._peek()]) <= seq_len:
            taken.append(self._peek())
            used += int(lengths[taken[-1]])
            self._advance()
        return taken


class ChatRows(StreamRows):
    """Rows of `seq_len` tokens, each whole conversations plus padding: (input_ids, position_ids, labels), int64."""

    kind = "chat"

    def __init__(self, data: ChatData, seq_len: int, num_streams: int, seed: int, shuffle: bool, pad_id: int,
                 overlong: str = "truncate"):
        self.data, self.seq_len, self.pad_id = data, seq_len, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.lengths = data.lengths()
        fits = self.lengths <= seq_len
        # a truncated conversation needs a label inside the row (the first token's label predicts nothing)
        learnable = data.first_label < seq_len
        keep = learnable & (fits if overlong == "drop" else True)
        self.eligible = np.flatnonzero(keep)
        self.truncated = int((~fits & keep).sum())
        self.dropped = int((~keep).sum())
        if len(self.eligible) == 0:
            raise ValueError(f"no conversation fits data.seq_len={seq_len} with an assistant token in it "
                             f"({self.dropped} left out); raise data.seq_len")
        if num_streams > len(self.eligible):
            raise ValueError(f"the chat data has {len(self.eligible)} conversations, fewer than the {num_streams} "
                             "data streams of this run; add data")
        super().__init__(num_streams)

    def summary(self) -> str:
        return (f"{len(self.eligible)} conversations at data.seq_len={self.seq_len}: {self.truncated} longer ones "
                f"truncated from the end, {self.dropped} left out (longer, with chat.overlong=drop, or with no "
                "assistant token within the row)")

    def identity(self) -> dict:
        return {"num_streams": self.num_streams, "seed": self.seed, "shuffle": self.shuffle,
                "num_docs": len(self.eligible)}

    def _new_stream(self, v: int) -> ConversationStream:
        return ConversationStream(self, v)

    def _seek_stream(self, stream: ConversationStream, position: list[int]) -> None:
        epoch, index, _ = position
        stream.seek(epoch, index)

    def _read_row(self, stream: ConversationStream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.pack(stream.next_row())

    def _skip_row(self, stream: ConversationStream) -> None:
        stream.next_row()

    def pack(self, conversations: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, pos, labels = [], [], []
        for c in conversations:
            c_ids, c_labels = self.data.conversation(c, self.seq_len)
            ids.append(c_ids)
            labels.append(c_labels)
            pos.append(np.arange(len(c_ids), dtype=np.int64))
        pad = self.seq_len - sum(len(x) for x in ids)
        if pad:
            ids.append(np.full(pad, self.pad_id, dtype=np.int64))
            labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            pos.append(np.arange(pad, dtype=np.int64))
        input_ids, position_ids = np.concatenate(ids), np.concatenate(pos)
        label_row = np.concatenate(labels).astype(np.int64)
        label_row[position_ids == 0] = IGNORE_INDEX  # nothing is predicted across a conversation boundary
        return input_ids, position_ids, label_row
