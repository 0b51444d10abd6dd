"""Qwen3-MoE model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / Qwen3MoeConfig into a checked `transformers.Qwen3MoeConfig`, and which layers are MoE.
Accepts both the transformers 4 spellings (`num_experts`, `rope_theta`, `torch_dtype`) and 5's (`num_local_experts`,
`rope_parameters`, `dtype`): transformers maps them itself, we only insist the fields exist, because its silent
defaults (128 experts, hidden 2048, ...) would otherwise build a model unlike the checkpoint.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3MoeConfig

from framework.models.family import read_raw_config

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "moe_intermediate_size", "num_experts_per_tok")


def check_config_dict(raw: dict[str, Any], source: str) -> None:
    """One-line errors for a config dict that cannot describe a Qwen3-MoE model."""
    model_type = raw.get("model_type", "qwen3_moe")
    if model_type != "qwen3_moe":
        raise ValueError(f"{source}: model_type is {model_type!r}, expected 'qwen3_moe'")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if "num_experts" not in raw and "num_local_experts" not in raw:
        missing.append("num_experts")
    if missing:
        raise ValueError(f"{source}: missing required Qwen3-MoE field(s) {', '.join(missing)}")
    if raw.get("num_experts", raw.get("num_local_experts")) != raw.get("num_local_experts", raw.get("num_experts")):
        # both spellings name one field; Qwen3MoeConfig would keep one of them silently
        raise ValueError(f"{source}: num_experts={raw['num_experts']} and num_local_experts={raw['num_local_experts']} "
                         "disagree")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act is {raw['hidden_act']!r}; Qwen3-MoE experts are SwiGLU ('silu')")


def load_hf_config(source: str | dict | Qwen3MoeConfig) -> Qwen3MoeConfig:
    """A checked Qwen3MoeConfig from a checkpoint directory, a config.json path, a dict or a config object."""
    if isinstance(source, Qwen3MoeConfig):
        config = source
    else:
        raw, where = read_raw_config(source)
        check_config_dict(raw, where)
        raw.pop("model_type", None)
        raw.pop("architectures", None)
        config = Qwen3MoeConfig(**raw)
    n_dense = config.intermediate_size if any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers)) \
        else None
    if n_dense is not None and not n_dense:
        raise ValueError("config: dense layers exist (mlp_only_layers / decoder_sparse_step) but intermediate_size "
                         "is not set")
    return config


def is_moe_layer(config: Qwen3MoeConfig, layer_idx: int) -> bool:
    """Same rule as transformers: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)
