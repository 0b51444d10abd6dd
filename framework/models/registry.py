"""The supported model families, by config.json model_type: adding one is its folder plus one line here.

Owns: `FAMILIES`, `family_for` (which family a checkpoint directory / config.json / dict / config object is),
`layout_for` / `moe_shape` (what the run plan and the trainer need to know of a family's layers: no model code is
imported), `architecture_for` (the family's layer modules too) and `meta_model` (the family's model with shapes only,
for counting parameters and FLOPs).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig

from framework.models.deepseek_v3.config import DEEPSEEK_V3_LAYOUT, is_mtp_key, load_deepseek_v3_config
from framework.models.family import Family, MoELayout, read_raw_config
from framework.models.mixtral.checkpoint import mixtral_checkpoint_key, mixtral_hub_key
from framework.models.mixtral.config import MIXTRAL_LAYOUT, load_mixtral_config
from framework.models.olmoe.config import OLMOE_LAYOUT, load_olmoe_config
from framework.models.qwen2_moe.config import QWEN2_MOE_LAYOUT, load_qwen2_moe_config
from framework.models.qwen3_moe.config import QWEN3_MOE_LAYOUT, load_hf_config

if TYPE_CHECKING:
    from framework.models.decoder import Architecture, MoECausalLM

# The causal LM classes by name: a family's model code (and transformers' modeling module) is imported when the
# family's model or Architecture is first asked for (Family.causal_lm), not when the table is read.
FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", load_hf_config, QWEN3_MOE_LAYOUT,
                        "framework.models.qwen3_moe.model:Qwen3MoeCausalLM", "Qwen3MoeForCausalLM"),
    "mixtral": Family("mixtral", load_mixtral_config, MIXTRAL_LAYOUT, "framework.models.mixtral.model:MixtralCausalLM",
                      "MixtralForCausalLM", mixtral_checkpoint_key, mixtral_hub_key),
    # hub checkpoints of both use transformers 5's per-expert names (conversion_mapping.py "qwen2_moe", which olmoe
    # shares): no key maps
    "qwen2_moe": Family("qwen2_moe", load_qwen2_moe_config, QWEN2_MOE_LAYOUT,
                        "framework.models.qwen2_moe.model:Qwen2MoeCausalLM", "Qwen2MoeForCausalLM"),
    "olmoe": Family("olmoe", load_olmoe_config, OLMOE_LAYOUT, "framework.models.olmoe.model:OlmoeCausalLM",
                    "OlmoeForCausalLM"),
    "deepseek_v3": Family("deepseek_v3", load_deepseek_v3_config, DEEPSEEK_V3_LAYOUT,
                          "framework.models.deepseek_v3.model:DeepseekV3CausalLM", "DeepseekV3ForCausalLM",
                          ignored_key=is_mtp_key),
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


def layout_for(config: PretrainedConfig) -> MoELayout:
    """The `MoELayout` of a loaded config's family (which layers are MoE, their shape), without its model code."""
    return family_for(config).layout


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The decoder `Architecture` of a loaded config's family (its layer modules, and its layout); imports the
    family's model code."""
    return family_for(config).causal_lm.architecture


def moe_shape(config: PretrainedConfig) -> tuple[int, int, int, bool]:
    """(expert FFN width, experts, top-k, renormalise) under the family's own field names (Mixtral:
    intermediate_size / num_local_experts; OLMoE: intermediate_size / num_experts; Qwen3-MoE, Qwen2-MoE:
    moe_intermediate_size / num_experts; DeepSeek-V3: moe_intermediate_size / n_routed_experts)."""
    return layout_for(config).moe_shape(config)


def head_dim(config: PretrainedConfig) -> int:
    """Attention head width: Mixtral configs may leave head_dim None (transformers then uses hidden / heads). MLA
    (deepseek_v3) sets head_dim to the rotary width qk_rope_head_dim (its query/key heads are qk_head_dim wide, its
    value heads v_head_dim)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def meta_model(config: PretrainedConfig) -> MoECausalLM:
    """The family's causal LM of a loaded config on the meta device: every parameter's name and shape, no memory,
    whatever the family adds (shared experts, dense layers, latent attention). All experts are local (no EP)."""
    import torch  # noqa: PLC0415

    from framework.models.options import ModelOptions  # noqa: PLC0415

    config = copy.deepcopy(config)  # the model sets its attention implementation on the config it is given
    with torch.device("meta"):
        return family_for(config).causal_lm(config, ModelOptions(backend="eager"))
