"""Mixtral on the shared decoder (framework/models/decoder.py): transformers' MixtralAttention (no q/k norm)
and rotary embedding, every layer MoE, and a router that always renormalises its top-k softmax weights, which is
transformers' MixtralTopKRouter (softmax, top-k, divide by their sum), i.e. our TopKRouter with norm_topk_prob."""

from __future__ import annotations

from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding

from framework.models.decoder import Architecture, MoECausalLM
from framework.models.mixtral.config import MIXTRAL_LAYOUT

MIXTRAL = Architecture(
    attention=MixtralAttention, rotary=MixtralRotaryEmbedding, qk_norm=False, layout=MIXTRAL_LAYOUT)


class MixtralCausalLM(MoECausalLM):
    architecture = MIXTRAL
