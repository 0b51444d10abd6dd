"""OLMoE model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / OlmoeConfig into a checked `transformers.OlmoeConfig`. The fields must be present
because OlmoeConfig's silent defaults (64 experts, hidden 2048, ...) would build a model unlike the checkpoint;
num_key_value_heads may be left out (transformers then uses num_attention_heads, as the released checkpoints do).
The expert count may be spelt num_experts or num_local_experts (OlmoeConfig maps one to the other).
"""

from __future__ import annotations


from transformers import OlmoeConfig

from framework.models.family import MoELayout, load_family_config

# intermediate_size is the expert FFN width: every OLMoE layer is MoE
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "num_experts_per_tok")


def check_config(config: OlmoeConfig, source: str) -> None:
    """One-line errors for what our layer does not compute the way transformers does."""
    if config.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act is {config.hidden_act!r}; OLMoE experts are SwiGLU ('silu')")
    # OlmoeAttention sizes q_norm / k_norm by hidden_size / num_attention_heads whatever head_dim says
    per_head = config.hidden_size // config.num_attention_heads
    if getattr(config, "head_dim", None) not in (None, per_head):
        raise ValueError(f"{source}: head_dim is {config.head_dim}; OLMoE's attention needs hidden_size / "
                         f"num_attention_heads ({per_head}); remove head_dim")
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"{source}: sliding_window {config.sliding_window} is not implemented (full causal "
                         "attention only); set it null")


def load_olmoe_config(source: str | dict | OlmoeConfig) -> OlmoeConfig:
    """A checked OlmoeConfig from a checkpoint directory, a config.json path, a dict or a config object."""
    config, _, where = load_family_config(source, OlmoeConfig, "olmoe", "OLMoE", REQUIRED_FIELDS,
                                          [("num_experts", "num_local_experts")])
    check_config(config, where)
    return config


OLMOE_LAYOUT = MoELayout(
    lambda c, i: True, lambda c: (c.intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob))
