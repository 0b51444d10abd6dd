"""DeepSeek-V3 on the shared decoder (framework/models/decoder.py): transformers' DeepseekV3Attention (multi-head
latent attention, MLA), its rotary embedding (yarn included) and DeepseekV3MLP (the first `first_k_dense_replace`
layers, and every MoE layer's shared experts), with our MoE block routed by the group-limited sigmoid router
(framework/moe/router.py GroupLimitedSigmoidRouter, numerically transformers' DeepseekV3TopkRouter).

The shared experts are the block's `shared_experts` (transformers' name: state dicts interchange), dense parameters to
ZeRO and expert parallelism (only `experts.*` are expert parameters), added to the routed experts' output ungated.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3MLP,
    DeepseekV3RotaryEmbedding,
)

from framework.models.decoder import Architecture, MoECausalLM
from framework.models.deepseek_v3.config import DEEPSEEK_V3_LAYOUT
from framework.models.options import ModelOptions
from framework.moe.layer import MoEBlock
from framework.moe.router import GroupLimitedSigmoidRouter


class DeepseekV3MoEBlock(MoEBlock):
    """Routed experts (ours) + transformers' shared-expert MLP of width moe_intermediate_size * n_shared_experts."""

    def __init__(self, config: DeepseekV3Config, options: ModelOptions):
        router = GroupLimitedSigmoidRouter(config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                                           config.n_group, config.topk_group, config.norm_topk_prob,
                                           config.routed_scaling_factor)
        super().__init__(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, router,
                         nn.SiLU(), options.backend, options.placement, options.z_loss_coef > 0)
        self.shared_experts = DeepseekV3MLP(config, intermediate_size=shared_expert_width(config))

    def shared_output(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.shared_experts(x_TH)


def shared_expert_width(config: DeepseekV3Config) -> int:
    return config.moe_intermediate_size * config.n_shared_experts


DEEPSEEK_V3 = Architecture(
    attention=DeepseekV3Attention, rotary=DeepseekV3RotaryEmbedding, qk_norm=False, layout=DEEPSEEK_V3_LAYOUT,
    dense_mlp=lambda c: DeepseekV3MLP(c, intermediate_size=c.intermediate_size), moe_block=DeepseekV3MoEBlock,
    # varlen too: the flash varlen path zero-pads MLA's narrower value heads (framework/models/attention.py)
    attention_implementations=("sdpa", "eager", "varlen"))


class DeepseekV3CausalLM(MoECausalLM):
    architecture = DEEPSEEK_V3
