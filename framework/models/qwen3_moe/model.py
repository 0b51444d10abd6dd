"""Qwen3-MoE on the shared decoder (framework/models/decoder.py): transformers' Qwen3MoeAttention with per-head q/k
RMSNorm, its rotary embedding and dense MLP (mlp_only_layers / decoder_sparse_step layers), and a softmax top-k
router that renormalises when norm_topk_prob is set."""

from __future__ import annotations

from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeMLP,
    Qwen3MoeRotaryEmbedding,
)

from framework.models.decoder import Architecture, MoECausalLM
from framework.models.qwen3_moe.config import QWEN3_MOE_LAYOUT

QWEN3_MOE = Architecture(
    attention=Qwen3MoeAttention, rotary=Qwen3MoeRotaryEmbedding, qk_norm=True, layout=QWEN3_MOE_LAYOUT,
    dense_mlp=lambda c: Qwen3MoeMLP(c, intermediate_size=c.intermediate_size))


class Qwen3MoeCausalLM(MoECausalLM):
    architecture = QWEN3_MOE
