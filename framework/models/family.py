"""What a model family is to the rest of the framework, and reading the raw config a family is chosen from.

Owns: `Family` (one per supported model_type, listed in registry.py) and `read_raw_config`. Does not own model code:
a family's folder (framework/models/<family>/) holds its config checks, `Architecture` and causal-LM class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    model_type: str
    load_config: Callable[[Any], PretrainedConfig]  # a checked config from a path / dict / config object
    causal_lm: type  # ours (a framework.models.decoder.MoECausalLM); built as causal_lm(config, options)
    stock_class: str  # transformers' class, config.json "architectures" on export
    # a stored checkpoint key -> the transformers 5 name our parameters use (hub spellings differ by family)
    checkpoint_key: Callable[[str], str] | None = None
    # the inverse, for `--format hf` exports: our per-expert names -> the hub's (None: they are the same)
    hub_key: Callable[[str], str] | None = None
    # checkpoint tensors the model does not have and transformers skips on load (DeepSeek-V3's multi-token-prediction
    # layers), given the config; None: every tensor must be the model's
    ignored_key: Callable[[PretrainedConfig, str], bool] | None = None


def read_raw_config(source: str | dict) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) for a checkpoint directory, a config.json path or a dict."""
    if isinstance(source, dict):
        return dict(source), "config dict"
    where = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.exists(where):
        raise FileNotFoundError(f"no config.json at {where}")
    with open(where) as f:
        return json.load(f), where
