"""Qwen3-MoE model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / Qwen3MoeConfig into a checked `transformers.Qwen3MoeConfig`, and which layers are MoE.
Accepts both the transformers 4 spellings (`num_experts`, `rope_theta`, `torch_dtype`) and 5's (`num_local_experts`,
`rope_parameters`, `dtype`): transformers maps them itself, we only insist the fields exist, because its silent
defaults (128 experts, hidden 2048, ...) would otherwise build a model unlike the checkpoint.
"""

from __future__ import annotations


from transformers import Qwen3MoeConfig

from framework.models.family import MoELayout, load_family_config

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "moe_intermediate_size", "num_experts_per_tok")


def load_hf_config(source: str | dict | Qwen3MoeConfig) -> Qwen3MoeConfig:
    """A checked Qwen3MoeConfig from a checkpoint directory, a config.json path, a dict or a config object."""
    config, _, where = load_family_config(source, Qwen3MoeConfig, "qwen3_moe", "Qwen3-MoE", REQUIRED_FIELDS,
                                          [("num_experts", "num_local_experts")])
    if config.hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act is {config.hidden_act!r}; Qwen3-MoE experts are SwiGLU ('silu')")
    if any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers)) and not config.intermediate_size:
        raise ValueError(f"{where}: dense layers exist (mlp_only_layers / decoder_sparse_step) but intermediate_size "
                         "is not set")
    return config


def is_moe_layer(config: Qwen3MoeConfig, layer_idx: int) -> bool:
    """Same rule as transformers: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


QWEN3_MOE_LAYOUT = MoELayout(
    is_moe_layer, lambda c: (c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob))
