"""DeepSeek-V3 model configuration (model_type deepseek_v3: DeepSeek-V3/R1, Moonlight, Kimi-K2): reading and checking
Hugging Face config.json files.

Owns: turning a path / dict / DeepseekV3Config into a checked `transformers.DeepseekV3Config`, and which layers are MoE.
The shape fields must be present because DeepseekV3Config's silent defaults (61 layers, 256 experts, q_lora_rank 1536,
...) would build a model unlike the checkpoint; `q_lora_rank` must be present even when null (Moonlight), since its
default turns the low-rank query path on. The expert count may be spelled `n_routed_experts` (the hub) or
`num_local_experts` (transformers 5's attribute map).
"""

from __future__ import annotations

import re

from transformers import DeepseekV3Config

from framework.models.family import MoELayout, load_family_config

REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
                   "first_k_dense_replace", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank",
                   "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def is_moe_layer(config: DeepseekV3Config, layer_idx: int) -> bool:
    """Same rule as transformers' DeepseekV3DecoderLayer: the first `first_k_dense_replace` layers are dense."""
    return layer_idx >= config.first_k_dense_replace


def is_mtp_key(config: DeepseekV3Config, key: str) -> bool:
    """A tensor of the multi-token-prediction layers that DeepSeek-V3 checkpoints store after the decoder
    (`model.layers.{num_hidden_layers + i}.*`, i < num_nextn_predict_layers): transformers' DeepseekV3ForCausalLM
    skips them on load (`_keys_to_ignore_on_load_unexpected`), and so do we (training them is not implemented)."""
    match = _LAYER_RE.match(key)
    if match is None:
        return False
    extra = int(match[1]) - config.num_hidden_layers
    return 0 <= extra < (config.num_nextn_predict_layers or 0)


def check_config(config: DeepseekV3Config, source: str) -> None:
    """One-line errors for what our layer does not compute the way transformers does, or cannot build."""
    experts, groups = config.n_routed_experts, config.n_group
    if config.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act is {config.hidden_act!r}; DeepSeek-V3 experts are SwiGLU ('silu')")
    # remote-code configs name the routing; transformers 5 always routes sigmoid + noaux_tc, so refuse any other
    if getattr(config, "scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"{source}: scoring_func is {config.scoring_func!r}; deepseek_v3 routes with 'sigmoid'")
    if getattr(config, "topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"{source}: topk_method is {config.topk_method!r}; deepseek_v3 routes with 'noaux_tc'")
    if groups < 1 or experts % groups:
        raise ValueError(f"{source}: n_group ({groups}) must divide n_routed_experts ({experts})")
    if experts // groups < 2:
        raise ValueError(f"{source}: each of the n_group ({groups}) groups needs >= 2 of the n_routed_experts "
                         f"({experts}): a group's score is the sum of its top 2")
    if not 1 <= config.topk_group <= groups:
        raise ValueError(f"{source}: topk_group ({config.topk_group}) must be between 1 and n_group ({groups})")
    if not 1 <= config.num_experts_per_tok <= config.topk_group * (experts // groups):
        raise ValueError(f"{source}: num_experts_per_tok ({config.num_experts_per_tok}) must be between 1 and the "
                         f"{config.topk_group * (experts // groups)} experts of topk_group groups")
    if config.n_shared_experts < 1:
        raise ValueError(f"{source}: n_shared_experts is {config.n_shared_experts}; deepseek_v3 layers have >= 1")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"{source}: num_key_value_heads ({config.num_key_value_heads}) must equal "
                         f"num_attention_heads ({config.num_attention_heads}): MLA expands keys per head")
    if not 0 <= config.first_k_dense_replace <= config.num_hidden_layers:
        raise ValueError(f"{source}: first_k_dense_replace ({config.first_k_dense_replace}) must be between 0 and "
                         f"num_hidden_layers ({config.num_hidden_layers})")


def load_deepseek_v3_config(source: str | dict | DeepseekV3Config) -> DeepseekV3Config:
    """A checked DeepseekV3Config from a checkpoint directory, a config.json path, a dict or a config object."""
    config, _, where = load_family_config(source, DeepseekV3Config, "deepseek_v3", "DeepSeek-V3", REQUIRED_FIELDS,
                                          spellings=[("n_routed_experts", "num_local_experts")])
    check_config(config, where)
    return config


DEEPSEEK_V3_LAYOUT = MoELayout(
    is_moe_layer, lambda c: (c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok, c.norm_topk_prob),
    experts_field="n_routed_experts", router_selection_bias=True)
