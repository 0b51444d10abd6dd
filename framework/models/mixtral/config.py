"""Mixtral model configuration: reading and checking Hugging Face config.json files.

Owns: turning a path / dict / MixtralConfig into a checked `transformers.MixtralConfig`. The fields must be present
because MixtralConfig's silent defaults (8 experts, hidden 4096, ...) would build a model unlike the checkpoint.
"""

from __future__ import annotations


from transformers import MixtralConfig

from framework.models.family import MoELayout, load_family_config

# intermediate_size is the expert FFN width: every Mixtral layer is MoE
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "num_experts_per_tok", "num_local_experts")


def check_config(config: MixtralConfig, source: str) -> None:
    """One-line errors for what our layer does not compute the way transformers does."""
    if config.hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act is {config.hidden_act!r}; Mixtral experts are SwiGLU ('silu')")
    if config.router_jitter_noise:
        raise ValueError(f"{source}: router_jitter_noise {config.router_jitter_noise} is not implemented; set it 0")
    if config.sliding_window is not None:
        raise ValueError(f"{source}: sliding_window {config.sliding_window} is not implemented (full causal "
                         "attention only); set it null")


def load_mixtral_config(source: str | dict | MixtralConfig) -> MixtralConfig:
    """A checked MixtralConfig from a checkpoint directory, a config.json path, a dict or a config object."""
    config, _, where = load_family_config(source, MixtralConfig, "mixtral", "Mixtral", REQUIRED_FIELDS)
    check_config(config, where)
    return config


MIXTRAL_LAYOUT = MoELayout(
    lambda c, i: True, lambda c: (c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, True),
    experts_field="num_local_experts")
