"""Random tokens for throughput runs (Megatron's --mock-data): no corpus, no tokenizer work, no routing skew.

Each row is one document of uniform random ids over the model's vocabulary, so the router sees tokens with no
structure and spreads them evenly: the condition stock benchmarks (and our anchors) measure under. Real text routes
unevenly at initialisation, which costs expert parallelism waiting time; benchmark both.
Batch i of rank r is a pure function of (seed, r, i): resuming needs only the batch index.
"""

from __future__ import annotations

import torch

STATE_FORMAT = "random-tokens-1"


class RandomTokenLoader:
    """Yields dict of int64 CPU tensors [micro_batch_size, seq_len]: input_ids, labels (= input_ids; the loss shifts
    them), position_ids (0..seq_len-1 in every row); the same contract as PackedDataLoader."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.dp_rank, self.seed = dp_rank, seed
        self.index = 0

    def __iter__(self) -> RandomTokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dp_rank) * 1_000_003 + self.index)
        self.index += 1
        ids = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_len), generator=g)
        pos = torch.arange(self.seq_len).expand(self.micro_batch_size, -1).contiguous()
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "index": self.index, "seed": self.seed, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data loader state has format {state.get('format')!r}; this run uses data.synthetic "
                             f"random tokens ({STATE_FORMAT}): resume with the data settings it was saved with")
        self.index = int(state["index"])
