"""The supported model families, by config.json model_type: adding one is its folder plus one line here.

Owns: `FAMILIES` and `family_for` (which family a checkpoint directory / config.json / dict / config object is).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from framework.models.family import Family, read_raw_config
from framework.models.mixtral.checkpoint import mixtral_checkpoint_key
from framework.models.mixtral.config import load_mixtral_config
from framework.models.mixtral.model import MixtralCausalLM
from framework.models.qwen3_moe.config import load_hf_config
from framework.models.qwen3_moe.model import Qwen3MoeCausalLM

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", load_hf_config, Qwen3MoeCausalLM, "Qwen3MoeForCausalLM"),
    "mixtral": Family("mixtral", load_mixtral_config, MixtralCausalLM, "MixtralForCausalLM", mixtral_checkpoint_key),
}


def family_for(source: str | dict[str, Any] | PretrainedConfig) -> Family:
    """The family of a config; a dict or config.json without model_type is Qwen3-MoE, as before families existed."""
    if isinstance(source, PretrainedConfig):
        model_type, where = source.model_type, "config"
    else:
        raw, where = read_raw_config(source)
        model_type = raw.get("model_type", "qwen3_moe")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{where}: model_type is {model_type!r}, which is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    return family
