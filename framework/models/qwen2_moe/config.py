"""Qwen2-MoE model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / Qwen2MoeConfig into a checked `transformers.Qwen2MoeConfig`, and which layers are MoE.
The fields must be present because Qwen2MoeConfig's silent defaults (60 experts, hidden 2048, ...) would build a
model unlike the checkpoint; intermediate_size (the dense layers' width) only where dense layers exist.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2MoeConfig

from framework.models.family import read_raw_config

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok")


def is_moe_layer(config: Qwen2MoeConfig, layer_idx: int) -> bool:
    """Same rule as transformers: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def check_config(config: Qwen2MoeConfig, source: str) -> None:
    """One-line errors for what our layer does not compute the way transformers does."""
    if config.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act is {config.hidden_act!r}; Qwen2-MoE experts are SwiGLU ('silu')")
    if config.use_sliding_window or "sliding_attention" in (config.layer_types or []):
        raise ValueError(f"{source}: use_sliding_window / sliding_attention layer_types are not implemented (full "
                         "causal attention only); set use_sliding_window false")


def load_qwen2_moe_config(source: str | dict | Qwen2MoeConfig) -> Qwen2MoeConfig:
    """A checked Qwen2MoeConfig from a checkpoint directory, a config.json path, a dict or a config object."""
    if isinstance(source, Qwen2MoeConfig):
        config, where = source, "config"
    else:
        raw, where = read_raw_config(source)
        if raw.get("model_type", "qwen2_moe") != "qwen2_moe":
            raise ValueError(f"{where}: model_type is {raw['model_type']!r}, expected 'qwen2_moe'")
        missing = [k for k in REQUIRED_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing required Qwen2-MoE field(s) {', '.join(missing)}")
        fields: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
        config = Qwen2MoeConfig(**fields)
        has_dense = any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers))
        if has_dense and "intermediate_size" not in raw:
            raise ValueError(f"{where}: dense layers exist (mlp_only_layers / decoder_sparse_step) but "
                             "intermediate_size is not set")
    check_config(config, where)
    return config
