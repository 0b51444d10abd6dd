"""Loading a Hugging Face tokenizer from a local directory and turning document texts into token ids.

Owns: `load_tokenizer` (local files only, one-line errors, an eos token required) and `encode_documents` (no special
tokens from the tokenizer; the eos id appended to every document, which is what marks document ends in the packed
stream). Does not own which documents are encoded when (see `stream.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from the local directory `path`; nothing is downloaded.

    Raises:
        FileNotFoundError: `path` is not a directory.
        ValueError: the directory holds no loadable tokenizer, or the tokenizer has no eos token.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: tokenizer directory does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unusable directories
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot load a tokenizer ({first})") from e
    check_eos(tokenizer, path)
    return tokenizer


def check_eos(tokenizer: PreTrainedTokenizerBase, where: str = "tokenizer") -> int:
    """The tokenizer's eos token id; ValueError when it has none (packing needs it to mark document ends)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{where}: tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    return int(tokenizer.eos_token_id)


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], eos_id: int) -> list[np.ndarray]:
    """Token ids of each text followed by `eos_id`, as int32 arrays; one batched call (fast tokenizers use all
    cores)."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
    out = []
    for ids in encoded:
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[:-1] = ids
        arr[-1] = eos_id
        out.append(arr)
    return out
