"""The model's shapes and parameter tensors, as the memory estimate needs them (no model is built).

Legend: H hidden, Q = heads x head_dim (query width), KV = kv_heads x head_dim, I expert FFN, Id dense FFN,
E experts, K top-k, V vocabulary, L layers.
Owns: `ModelShape` (the widths the activation formulas use) and `param_inventory`, every parameter tensor of
`Qwen3MoeCausalLM` in `named_parameters()` order (the order DeepSpeed fills optimizer groups and ZeRO-3 sub-groups
in), each marked dense or expert. A test checks the inventory against a model built on the meta device.
Does not own: how ZeRO splits them (framework/tuning/estimate.py).
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def model_shape(hf_config) -> ModelShape:
    """Widths of a checked `Qwen3MoeConfig` (framework.models.qwen3_moe.config.load_hf_config)."""
    from framework.models.qwen3_moe.config import is_moe_layer  # noqa: PLC0415

    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    moe = tuple(is_moe_layer(hf_config, i) for i in range(hf_config.num_hidden_layers))
    return ModelShape(
        hidden=hf_config.hidden_size, heads=heads, kv_heads=hf_config.num_key_value_heads, head_dim=head_dim,
        vocab=hf_config.vocab_size, num_layers=hf_config.num_hidden_layers, moe_layers=moe,
        num_experts=hf_config.num_experts, top_k=hf_config.num_experts_per_tok,
        moe_intermediate=hf_config.moe_intermediate_size,
        dense_intermediate=hf_config.intermediate_size if not all(moe) else 0,
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        tied_embeddings=bool(hf_config.tie_word_embeddings))


@dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int  # the whole tensor; for expert tensors all E experts (a rank holds E/ep of them under EP)
    expert: bool  # a stacked expert tensor ([E, 2I, H] or [E, H, I]): sliced over EP, partitioned over EDP
    layer: int | None = None  # decoder layer index; None for embeddings, final norm, LM head


def _linear(name: str, n_in: int, n_out: int, bias: bool, layer: int) -> list[ParamSpec]:
    out = [ParamSpec(f"{name}.weight", n_in * n_out, False, layer)]
    return out + ([ParamSpec(f"{name}.bias", n_out, False, layer)] if bias else [])


def _layer_params(s: ModelShape, i: int) -> list[ParamSpec]:
    """One decoder layer, in module registration order: self_attn, mlp, input_layernorm, post_attention_layernorm."""
    pre = f"model.layers.{i}"
    h, q, kv = s.hidden, s.q_width, s.kv_width
    params = (_linear(f"{pre}.self_attn.q_proj", h, q, s.attention_bias, i)
              + _linear(f"{pre}.self_attn.k_proj", h, kv, s.attention_bias, i)
              + _linear(f"{pre}.self_attn.v_proj", h, kv, s.attention_bias, i)
              + _linear(f"{pre}.self_attn.o_proj", q, h, s.attention_bias, i)
              + [ParamSpec(f"{pre}.self_attn.q_norm.weight", s.head_dim, False, i),
                 ParamSpec(f"{pre}.self_attn.k_norm.weight", s.head_dim, False, i)])
    if s.moe_layers[i]:
        e, inter = s.num_experts, s.moe_intermediate
        params += [ParamSpec(f"{pre}.mlp.gate.weight", e * h, False, i),  # the router stays dense (replicated)
                   ParamSpec(f"{pre}.mlp.experts.gate_up_proj", e * 2 * inter * h, True, i),
                   ParamSpec(f"{pre}.mlp.experts.down_proj", e * h * inter, True, i)]
    else:
        d = s.dense_intermediate
        params += (_linear(f"{pre}.mlp.gate_proj", h, d, False, i) + _linear(f"{pre}.mlp.up_proj", h, d, False, i)
                   + _linear(f"{pre}.mlp.down_proj", d, h, False, i))
    return params + [ParamSpec(f"{pre}.input_layernorm.weight", h, False, i),
                     ParamSpec(f"{pre}.post_attention_layernorm.weight", h, False, i)]


def param_inventory(s: ModelShape) -> list[ParamSpec]:
    """Every trainable tensor, in `Qwen3MoeCausalLM.named_parameters()` order (a tied LM head is not repeated)."""
    params = [ParamSpec("model.embed_tokens.weight", s.vocab * s.hidden, False)]
    for i in range(s.num_layers):
        params += _layer_params(s, i)
    params.append(ParamSpec("model.norm.weight", s.hidden, False))
    if not s.tied_embeddings:
        params.append(ParamSpec("lm_head.weight", s.vocab * s.hidden, False))
    return params


def local_numel(p: ParamSpec, ep_size: int) -> int:
    """Elements of `p` one rank holds before ZeRO: its E/ep experts of an expert tensor, all of a dense one."""
    return p.numel // ep_size if p.expert else p.numel
