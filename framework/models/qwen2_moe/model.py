"""Qwen2-MoE on the shared decoder (framework/models/decoder.py): transformers' Qwen2MoeAttention (q/k/v bias as
configured, no q/k norm), its rotary embedding and dense MLP (mlp_only_layers / decoder_sparse_step layers), a softmax
top-k router that renormalises only when norm_topk_prob is set, and one shared expert per MoE layer that every token
passes through, scaled by a sigmoid gate (transformers' Qwen2MoeSparseMoeBlock)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeMLP,
    Qwen2MoeRotaryEmbedding,
)

from framework.models.decoder import Architecture, MoECausalLM
from framework.models.options import ModelOptions
from framework.models.qwen2_moe.config import QWEN2_MOE_LAYOUT
from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter


class Qwen2MoeBlock(MoEBlock):
    """Routed experts plus `shared_expert` (transformers' Qwen2MoeMLP, shared_expert_intermediate_size wide) gated by
    `shared_expert_gate` (Linear(H, 1), sigmoid), under transformers' names. Only `experts.*` are expert parameters:
    the shared expert and its gate are dense for ZeRO and expert parallelism (every rank computes them for its own
    tokens)."""

    def __init__(self, config: Qwen2MoeConfig, options: ModelOptions):
        h = config.hidden_size
        router = TopKRouter(h, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob)
        # nn.SiLU, which the fused SwiGLU recognises: the config check accepts hidden_act "silu" only
        super().__init__(h, config.moe_intermediate_size, config.num_experts, router, nn.SiLU(), options.backend,
                         options.placement, options.z_loss_coef > 0)
        self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def shared_output(self, x_TH: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)


QWEN2_MOE = Architecture(
    attention=Qwen2MoeAttention, rotary=Qwen2MoeRotaryEmbedding, qk_norm=False, layout=QWEN2_MOE_LAYOUT,
    dense_mlp=lambda c: Qwen2MoeMLP(c, intermediate_size=c.intermediate_size),
    moe_block=Qwen2MoeBlock)


class Qwen2MoeCausalLM(MoECausalLM):
    architecture = QWEN2_MOE
