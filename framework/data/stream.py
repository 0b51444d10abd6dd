"""One data-parallel rank's endless token stream: its documents, epoch after epoch, with a small resumable position.

Owns: walking the rank's document list (`order.rank_documents`) across epoch boundaries, tokenising documents lazily in
batched windows just ahead of the read position, and the position itself, `(epoch, doc_index, token_offset)`: the
next token to hand out is token `token_offset` (eos included) of document `doc_index` of this rank's list for `epoch`.
That triple is all a resume needs; re-reading it costs one tokenizer call. Does not own reading files (`sources.py`),
the tokenizer (`tokenizer.py`) or the layout of rows (`packing.py`).

Tokenised documents are kept in memory while their total stays under `memo_tokens` (small corpora, such as the demo,
are then tokenised once per rank, whatever the number of epochs); past it, only the current window is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from framework.data.order import docs_per_rank, rank_documents
from framework.data.sources import Corpus

Encoder = Callable[[Sequence[str]], list[np.ndarray]]


class DocumentStream:
    def __init__(self, corpus: Corpus, encode: Encoder, *, seed: int, shuffle: bool, dp_rank: int, dp_world: int,
                 window_docs: int = 64, memo_tokens: int = 1 << 24):
        if corpus.num_docs < dp_world:  # checked on every rank, so that all of them stop, not only the empty ones
            raise ValueError(f"the corpus has {corpus.num_docs} documents, fewer than dp_world ({dp_world}); "
                             f"every data-parallel rank needs at least one: add data or use fewer ranks")
        self.docs_per_epoch = docs_per_rank(corpus.num_docs, dp_rank, dp_world)
        self._corpus, self._encode = corpus, encode
        self._seed, self._shuffle, self._dp_rank, self._dp_world = seed, shuffle, dp_rank, dp_world
        self._window_docs, self._memo_tokens = window_docs, memo_tokens
        self.epoch, self.doc_index, self.token_offset = 0, 0, 0
        self._docs_epoch, self._docs = -1, np.empty(0, dtype=np.int64)
        self._memo: dict[int, np.ndarray] = {}
        self._memo_size = 0
        self._window: dict[int, np.ndarray] = {}

    # -------------------------------------------------------------------------------------------------- position

    def seek(self, epoch: int, doc_index: int, token_offset: int) -> None:
        """Move to a position from `position()`; ValueError if it cannot be one for this corpus and rank."""
        if epoch < 0 or not 0 <= doc_index < self.docs_per_epoch:
            raise ValueError(f"data position epoch={epoch}, doc_index={doc_index} is outside this rank's "
                             f"{self.docs_per_epoch} documents per epoch")
        before = self.position()
        self.epoch, self.doc_index, self.token_offset = epoch, doc_index, 0
        length, doc_id = len(self._current_tokens()), self._doc_id()
        if not 0 <= token_offset < length:
            self.epoch, self.doc_index, self.token_offset = before  # a failed seek leaves the position unchanged
            raise ValueError(f"data position token_offset={token_offset} is outside document {doc_id} "
                             f"({length} tokens with eos); was the tokenizer or the data changed?")
        self.token_offset = token_offset

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.doc_index, self.token_offset

    # ---------------------------------------------------------------------------------------------------- reading

    def take(self, n: int) -> list[np.ndarray]:
        """The next `n` tokens as segments, each from one document; every segment after the first starts a document."""
        segments = []
        while n > 0:
            tokens = self._current_tokens()
            piece = tokens[self.token_offset:self.token_offset + n]
            segments.append(piece)
            n -= len(piece)
            self.token_offset += len(piece)
            if self.token_offset == len(tokens):
                self._next_document()
        return segments

    def _next_document(self) -> None:
        self.token_offset = 0
        self.doc_index += 1
        if self.doc_index == self.docs_per_epoch:
            self.epoch, self.doc_index = self.epoch + 1, 0

    def _epoch_docs(self) -> np.ndarray:
        if self._docs_epoch != self.epoch:
            self._docs = rank_documents(self._corpus.num_docs, self._seed, self.epoch, self._shuffle,
                                        self._dp_rank, self._dp_world)
            self._docs_epoch = self.epoch
            self._window = {}
        return self._docs

    def _doc_id(self) -> int:
        return int(self._epoch_docs()[self.doc_index])

    def _current_tokens(self) -> np.ndarray:
        doc_id = self._doc_id()
        tokens = self._memo.get(doc_id)
        if tokens is None:
            tokens = self._window.get(doc_id)
        if tokens is None:
            self._fill_window()
            tokens = self._memo.get(doc_id)
            tokens = self._window[doc_id] if tokens is None else tokens
        return tokens

    def _fill_window(self) -> None:
        """Tokenise, in one call, the documents from the current one to `window_docs` ahead (within this epoch)."""
        ahead = self._epoch_docs()[self.doc_index:self.doc_index + self._window_docs]
        doc_ids = [int(d) for d in ahead if int(d) not in self._memo]
        self._window = {}
        for doc_id, tokens in zip(doc_ids, self._encode(self._corpus.texts(doc_ids))):
            if self._memo_size + len(tokens) <= self._memo_tokens:
                self._memo[doc_id] = tokens
                self._memo_size += len(tokens)
            else:
                self._window[doc_id] = tokens
