"""Qwen2-MoE model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / Qwen2MoeConfig into a checked `transformers.Qwen2MoeConfig`, and which layers are MoE.
The fields must be present because Qwen2MoeConfig's silent defaults (60 experts, hidden 2048, ...) would build a
model unlike the checkpoint; intermediate_size (the dense layers' width) only where dense layers exist.
"""

from __future__ import annotations


from transformers import Qwen2MoeConfig

from framework.models.family import MoELayout, load_family_config

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
    config, raw, where = load_family_config(source, Qwen2MoeConfig, "qwen2_moe", "Qwen2-MoE", REQUIRED_FIELDS)
    has_dense = any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers))
    if raw is not None and has_dense and "intermediate_size" not in raw:
        raise ValueError(f"{where}: dense layers exist (mlp_only_layers / decoder_sparse_step) but "
                         "intermediate_size is not set")
    check_config(config, where)
    return config


QWEN2_MOE_LAYOUT = MoELayout(
    is_moe_layer, lambda c: (c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob))
