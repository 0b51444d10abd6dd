"""The expert geometry of a Qwen3-MoE or DeepSeek-V3 checkpoint, read straight from its config.json.

Owns: the few config fields that checkpoint conversion needs (expert count, hidden and expert intermediate sizes, which
layers are MoE), accepting both the transformers 4 spelling (`num_experts`) and 5's (`num_local_experts`); DeepSeek-V3
spells the count `n_routed_experts` and makes the layers from `first_k_dense_replace` on MoE. Works on the
raw JSON so that conversion never depends on a transformers config class (whose silent defaults would hide a missing
field). Does not own model construction (see `framework/models/qwen3_moe/config.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ExpertConfig:
    num_experts: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    source: str  # the config.json path, for error messages


def moe_layer_indices(num_layers: int, num_experts: int, mlp_only_layers: list[int], sparse_step: int) -> list[int]:
    """The MoE layers, by the rule transformers' Qwen3MoeDecoderLayer uses."""
    if num_experts <= 0 or sparse_step <= 0:
        return []
    return [i for i in range(num_layers) if i not in mlp_only_layers and (i + 1) % sparse_step == 0]


def read_expert_config(checkpoint_dir: str) -> ExpertConfig:
    """The expert geometry from `checkpoint_dir/config.json`; ValueError / FileNotFoundError with one-line messages."""
    path = os.path.join(checkpoint_dir, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint_dir}: no {CONFIG_NAME} (needed to know the expert shapes)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    model_type = raw.get("model_type", "qwen3_moe")
    if model_type not in ("qwen3_moe", "deepseek_v3"):
        raise ValueError(f"{path}: model_type is {model_type!r}, expected 'qwen3_moe' or 'deepseek_v3'")
    if model_type == "deepseek_v3":
        return _deepseek_v3_expert_config(raw, path)
    counts = {k: raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{path}: num_experts={counts['num_experts']} and num_local_experts="
                         f"{counts['num_local_experts']} disagree")
    missing = [k for k in ("hidden_size", "moe_intermediate_size", "num_hidden_layers") if k not in raw]
    if not counts:
        missing.append("num_experts (or num_local_experts)")
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    num_experts = int(next(iter(counts.values())))
    layers = moe_layer_indices(int(raw["num_hidden_layers"]), num_experts, list(raw.get("mlp_only_layers") or []),
                               int(raw.get("decoder_sparse_step", 1) or 1))
    return ExpertConfig(num_experts, int(raw["hidden_size"]), int(raw["moe_intermediate_size"]),
                        int(raw["num_hidden_layers"]), tuple(layers), path)


def _deepseek_v3_expert_config(raw: dict, path: str) -> ExpertConfig:
    """transformers' DeepseekV3DecoderLayer: layers first_k_dense_replace.. are MoE, n_routed_experts experts each."""
    counts = {raw[k] for k in ("n_routed_experts", "num_local_experts") if raw.get(k) is not None}
    if len(counts) > 1:
        raise ValueError(f"{path}: n_routed_experts and num_local_experts disagree ({sorted(counts)})")
    missing = [k for k in ("hidden_size", "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace")
               if k not in raw]
    if not counts:
        missing.append("n_routed_experts")
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
    layers = int(raw["num_hidden_layers"])
    return ExpertConfig(int(counts.pop()), int(raw["hidden_size"]), int(raw["moe_intermediate_size"]), layers,
                        tuple(range(int(raw["first_k_dense_replace"]), layers)), path)
