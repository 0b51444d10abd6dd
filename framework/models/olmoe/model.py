"""OLMoE on the shared decoder (framework/models/decoder.py): transformers' OlmoeAttention and rotary embedding, every
layer MoE with experts intermediate_size wide, and a softmax top-k router that renormalises only when norm_topk_prob
is set (transformers' OlmoeTopKRouter, i.e. our TopKRouter).

OlmoeAttention keeps its own q_norm / k_norm: RMSNorms over the whole projected width (all heads together), not per
head, so the decoder must not replace them with per-head norms (qk_norm=False). It also applies clip_qkv itself."""

from __future__ import annotations

from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding

from framework.models.decoder import Architecture, MoECausalLM
from framework.models.olmoe.config import OLMOE_LAYOUT

OLMOE = Architecture(
    attention=OlmoeAttention, rotary=OlmoeRotaryEmbedding, qk_norm=False, layout=OLMOE_LAYOUT)


class OlmoeCausalLM(MoECausalLM):
    architecture = OLMOE
