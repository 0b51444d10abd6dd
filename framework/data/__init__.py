"""Training data for pretraining: documents from files, tokenised, packed into fixed-length rows per data-parallel rank.

    tokenizer = load_tokenizer(DEMO_TOKENIZER_DIR)
    loader = PackedDataLoader([build_demo_corpus(cache_dir)], tokenizer, seq_len=256, micro_batch_size=8,
                              dp_rank=0, dp_world=1, cache_dir=cache_dir)
    batch = next(loader)          # input_ids, labels, position_ids: int64 [8, 256]
    saved = loader.state_dict()   # small JSON-serialisable position; load_state_dict(saved) resumes exactly

Modules: `sources` (files -> documents), `tokenizer` (tokenizer loading, text -> ids + eos), `order` (each epoch's
document order and each rank's share), `stream` (a rank's endless token stream and its position), `packing` (rows,
position ids, labels), `loader` (`PackedDataLoader`), `demo` (the locally built demo corpus).
"""

import os

from framework.data.demo import build_demo_corpus
from framework.data.loader import PackedDataLoader
from framework.data.tokenizer import load_tokenizer

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer")

__all__ = ["DEMO_TOKENIZER_DIR", "PackedDataLoader", "build_demo_corpus", "load_tokenizer"]
