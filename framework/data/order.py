"""Which documents a data-parallel rank reads in each epoch.

Owns: the document order of an epoch (a permutation fixed by `(seed, epoch)`, or file order without shuffling) and
the rank's share of it (every `dp_world`-th document from `dp_rank`). Pure functions of integers: the same arguments
give the same order on every machine, numpy version and Python version, because the permutation is an argsort of a
hand-written hash (splitmix64) rather than a library RNG whose stream may change between releases.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64_int(x: int) -> int:
    x = (x + _GAMMA) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy array arithmetic wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(num_docs: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Document ids of epoch `epoch` in reading order, int64 [num_docs]."""
    if not shuffle:
        return np.arange(num_docs, dtype=np.int64)
    base = _splitmix64_int(_splitmix64_int(seed & _MASK) ^ (epoch & _MASK))
    stream = np.arange(1, num_docs + 1, dtype=np.uint64) * np.uint64(_GAMMA) + np.uint64(base)
    return np.argsort(_splitmix64_array(stream), kind="stable").astype(np.int64)


def docs_per_rank(num_docs: int, dp_rank: int, dp_world: int) -> int:
    """How many documents rank `dp_rank` reads per epoch (the same every epoch)."""
    return len(range(dp_rank, num_docs, dp_world))


def rank_documents(num_docs: int, seed: int, epoch: int, shuffle: bool, dp_rank: int, dp_world: int) -> np.ndarray:
    """The document ids rank `dp_rank` of `dp_world` reads in epoch `epoch`, in order: positions r, r+W, ... of the
    epoch order. Ranks' lists are disjoint and together hold every document once."""
    return epoch_order(num_docs, seed, epoch, shuffle)[dp_rank::dp_world]
