"""Turning pieces of documents into packed training rows.

Owns: the layout of one row (`input_ids`, `position_ids`, `labels`) and the micro-batch tensors. A row is a list of
segments, each a run of tokens from one document that starts either at that document's start or at the row's start;
position ids count from 0 in every segment, and the first token of every segment gets label -100, so no token is
predicted from another document (nor from a part of its own document that lies in an earlier row). Does not own where
the segments come from (see `stream.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def pack_row(segments: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, position_ids), int64 [seq_len] each, from segments whose lengths sum to `seq_len`."""
    lengths = [len(s) for s in segments]
    assert sum(lengths) == seq_len and min(lengths) > 0, (lengths, seq_len)
    input_ids = np.concatenate(segments).astype(np.int64)
    position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    return input_ids, position_ids


def labels_for(input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """`input_ids` with IGNORE_INDEX wherever a segment starts (position id 0)."""
    return np.where(position_ids == 0, IGNORE_INDEX, input_ids)


def make_batch(rows: Sequence[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
    """Stack rows into int64 CPU tensors [micro_batch_size, seq_len]: input_ids, labels, position_ids. A row is
    (input_ids, position_ids), labelled by `labels_for`, or (input_ids, position_ids, labels) when its source decides
    what is learnt (chat data: assistant tokens only, framework/data/chat_rows.py)."""
    input_ids = np.stack([row[0] for row in rows])
    position_ids = np.stack([row[1] for row in rows])
    labels = (np.stack([row[2] for row in rows]) if len(rows[0]) == 3 else labels_for(input_ids, position_ids))
    return {"input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": torch.from_numpy(position_ids)}
