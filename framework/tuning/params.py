"""The model's shapes and parameter tensors, as the memory estimate needs them (no memory is allocated).

Legend: H hidden, Q = heads x head_dim (query width), KV = kv_heads x head_dim, I expert FFN, Id dense FFN,
E experts, K top-k, V vocabulary, L layers.
Owns: `ModelShape` (the widths the activation formulas use) and `param_inventory`, every parameter tensor of the
family's causal LM (framework/models/registry.py) in `named_parameters()` order (the order DeepSpeed fills optimizer
groups and ZeRO-3 sub-groups in), each marked dense or expert, taken from the model built on the meta device. A test
checks the total against stock transformers' model of the same config.
Does not own: how ZeRO splits them (framework/tuning/estimate.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PretrainedConfig

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    hidden: int  # H
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V
    num_layers: int  # L
    moe_layers: tuple[bool, ...]  # per layer: sparse MoE block (else the dense SwiGLU MLP)
    num_experts: int  # E
    top_k: int  # K
    moe_intermediate: int  # I
    dense_intermediate: int  # Id (0 when every layer is MoE)
    attention_bias: bool
    tied_embeddings: bool
    qk_norm: bool  # per-head RMSNorm on queries and keys (Qwen3-MoE; not Mixtral): its saved activations

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def model_shape(hf_config: PretrainedConfig) -> ModelShape:
    """Widths of a checked config of any registered family (registry `family_for(...).load_config`), under the
    family's own field names (registry.moe_shape, head_dim, MoELayout.is_moe_layer)."""
    from framework.models.registry import architecture_for, head_dim, moe_shape  # noqa: PLC0415

    arch = architecture_for(hf_config)
    is_moe = arch.layout.is_moe_layer
    moe = tuple(is_moe(hf_config, i) for i in range(hf_config.num_hidden_layers))
    expert_width, num_experts, top_k, _ = moe_shape(hf_config)
    return ModelShape(
        hidden=hf_config.hidden_size, heads=hf_config.num_attention_heads, kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim(hf_config), vocab=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers,
        moe_layers=moe, num_experts=num_experts, top_k=top_k, moe_intermediate=expert_width,
        dense_intermediate=hf_config.intermediate_size if not all(moe) else 0,
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        tied_embeddings=bool(hf_config.tie_word_embeddings), qk_norm=arch.qk_norm)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int  # the whole tensor; for expert tensors all E experts (a rank holds E/ep of them under EP)
    expert: bool  # a stacked expert tensor ([E, 2I, H] or [E, H, I]): sliced over EP, partitioned over EDP
    layer: int | None = None  # decoder layer index; None for embeddings, final norm, LM head


def param_inventory(hf_config: PretrainedConfig) -> list[ParamSpec]:
    """Every trainable tensor of the family's causal LM, in `named_parameters()` order (a tied LM head is named once),
    read off the model built on the meta device: whatever the family adds (q/k norms, biases, shared experts, dense
    layers, latent attention) is counted by construction. Expert tensors are those of each MoE block's `experts`
    child (all E experts: the meta model is built without expert parallelism)."""
    from framework.models.registry import meta_model  # noqa: PLC0415

    model = meta_model(hf_config)
    experts = {id(p) for block in model.moe_blocks() for p in block.experts.parameters()}
    params = []
    for name, p in model.named_parameters():
        layer = _LAYER_RE.search(name)
        params.append(ParamSpec(name, p.numel(), id(p) in experts, int(layer[1]) if layer else None))
    return params


def local_numel(p: ParamSpec, ep_size: int) -> int:
    """Elements of `p` one rank holds before ZeRO: its E/ep experts of an expert tensor, all of a dense one."""
    return p.numel // ep_size if p.expert else p.numel
