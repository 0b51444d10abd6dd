"""PackedDataLoader: endless, deterministic, resumable micro-batches of packed documents for one data-parallel rank.

Owns: argument checks, wiring corpus -> tokenizer -> rank stream -> packed rows, and the loader's state dict. Does not
own any of those pieces (see `sources.py`, `tokenizer.py`, `stream.py`, `packing.py`, `order.py`).

Each batch is `micro_batch_size` consecutive rows of `seq_len` tokens from this rank's stream (documents + eos in the
epoch's order, continuing into the next epoch without a break), so the same (paths, tokenizer, seed, dp_rank,
dp_world) always give the same batches, and a loader restored from `state_dict()` continues exactly where the saved one
stopped.

State dict (JSON-serialisable, constant size):
    {"format": 1, "epoch": int, "doc_index": int, "token_offset": int,
     "seed": int, "shuffle": bool, "dp_rank": int, "dp_world": int, "num_docs": int}
`epoch`/`doc_index`/`token_offset` locate the next token; the other keys are checked on load, because the same
position means different data under another seed, rank layout or corpus. `seq_len` and `micro_batch_size` may change
across a resume: the position is in tokens, not rows.
"""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedTokenizerBase

from framework.data.packing import make_batch, pack_row
from framework.data.sources import open_corpus
from framework.data.stream import DocumentStream
from framework.data.tokenizer import check_eos, encode_documents

STATE_FORMAT = 1
_POSITION_KEYS = ("epoch", "doc_index", "token_offset")
_CHECKED_KEYS = ("seed", "shuffle", "dp_rank", "dp_world", "num_docs")


def _check_args(seq_len: int, micro_batch_size: int, dp_rank: int, dp_world: int) -> None:
    errors = []
    if seq_len < 1:
        errors.append(f"seq_len ({seq_len}) must be >= 1")
    if micro_batch_size < 1:
        errors.append(f"micro_batch_size ({micro_batch_size}) must be >= 1")
    if dp_world < 1:
        errors.append(f"dp_world ({dp_world}) must be >= 1")
    elif not 0 <= dp_rank < dp_world:
        errors.append(f"dp_rank ({dp_rank}) must be in [0, dp_world) = [0, {dp_world})")
    if errors:
        raise ValueError("; ".join(errors))


class PackedDataLoader:
    """Endless iterator of packed micro-batches for rank `dp_rank` of `dp_world`.

    Args:
        paths: data files or folders (see `framework/data/sources.py` for the formats).
        tokenizer: a Hugging Face tokenizer with an eos token (`load_tokenizer`).
        seq_len: tokens per row.
        micro_batch_size: rows per batch.
        dp_rank, dp_world: this rank and the number of data-parallel ranks; rank r reads documents r, r+W, ... of
            each epoch's order.
        seed: fixes each epoch's document order (epoch e is shuffled with (seed, e)).
        text_field: the JSON / parquet / dataset column holding the text.
        shuffle: False reads documents in file order every epoch.
        cache_dir: where `datasets` keeps its Arrow conversions of JSON and parquet files (HF default when None).

    Yields:
        dict of int64 CPU tensors [micro_batch_size, seq_len]: input_ids, labels (-100 where a document or a row
        starts), position_ids (0 at every document start and every row start).
    """

    def __init__(self, paths: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_world: int, seed: int = 0, text_field: str = "text", shuffle: bool = True,
                 cache_dir: str | None = None):
        _check_args(seq_len, micro_batch_size, dp_rank, dp_world)
        eos_id = check_eos(tokenizer)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self._identity = {"seed": int(seed), "shuffle": bool(shuffle), "dp_rank": int(dp_rank),
                          "dp_world": int(dp_world)}
        corpus = open_corpus(paths, text_field, cache_dir)
        self._identity["num_docs"] = corpus.num_docs
        self.num_docs = corpus.num_docs
        self._stream = DocumentStream(corpus, functools.partial(encode_documents, tokenizer, eos_id=eos_id),
                                      seed=seed, shuffle=shuffle, dp_rank=dp_rank, dp_world=dp_world)

    @property
    def epoch(self) -> int:
        """The epoch of the next token to be read (0-based)."""
        return self._stream.epoch

    def __iter__(self) -> PackedDataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [pack_row(self._stream.take(self.seq_len), self.seq_len) for _ in range(self.micro_batch_size)]
        return make_batch(rows)

    def state_dict(self) -> dict:
        epoch, doc_index, token_offset = self._stream.position()
        return {"format": STATE_FORMAT, "epoch": epoch, "doc_index": doc_index, "token_offset": token_offset,
                **self._identity}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of a loader built with the same data, seed and ranks).

        Raises:
            ValueError: keys missing, an unknown format, or seed / shuffle / ranks / document count differing from
                this loader's (all differences listed at once).
        """
        missing = [k for k in ("format", *_POSITION_KEYS, *_CHECKED_KEYS) if k not in state]
        if missing:
            raise ValueError(f"data loader state lacks {', '.join(missing)}; is it a PackedDataLoader state dict?")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"data loader state has format {state['format']}, this version reads {STATE_FORMAT}")
        diffs = [f"{k} {state[k]!r} != {self._identity[k]!r}" for k in _CHECKED_KEYS if state[k] != self._identity[k]]
        if diffs:
            raise ValueError(f"data loader state does not match this loader (saved vs now: {'; '.join(diffs)}); "
                             f"rebuild the loader with the saved settings and data")
        self._stream.seek(int(state["epoch"]), int(state["doc_index"]), int(state["token_offset"]))
