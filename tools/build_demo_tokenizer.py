#!/usr/bin/env python
"""Train the demo tokenizer that ships in framework/assets/tokenizer: a byte-level BPE on the demo corpus.

Byte-level, so any text tokenises (no unknown tokens), with a vocabulary small enough (4096) that a tiny model's
embedding and output layers stay cheap and its loss falls within the first few hundred steps on a CPU. Special tokens:
<|endoftext|> (eos, id 0) and <|pad|> (id 1). The output loads with `transformers.AutoTokenizer` and nothing else.

    python tools/build_demo_tokenizer.py [--out framework/assets/tokenizer] [--vocab_size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from framework.data import DEMO_TOKENIZER_DIR  # noqa: E402
from framework.data.demo import demo_documents  # noqa: E402

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((doc["text"] for doc in demo_documents()), trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out: str) -> None:
    """tokenizer.json + tokenizer_config.json, written by hand so the files do not depend on the transformers version
    (`PreTrainedTokenizerFast` loads in transformers 4 and 5)."""
    os.makedirs(out, exist_ok=True)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
              "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEMO_TOKENIZER_DIR, help="output directory (default: the shipped one)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    args = parser.parse_args(argv)
    tokenizer = train(args.vocab_size)
    save(tokenizer, args.out)
    # Check the result the way the trainer will load it.
    from framework.data import load_tokenizer
    loaded = load_tokenizer(args.out)
    sample = "Return the canonical string representation of the object. \u00e9\u4e2d\U0001f642"
    assert loaded.decode(loaded(sample, add_special_tokens=False)["input_ids"]) == sample
    print(f"wrote {args.out}: vocab {loaded.vocab_size}, eos {loaded.eos_token!r} = {loaded.eos_token_id}, "
          f"pad {loaded.pad_token!r} = {loaded.pad_token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
