"""The decoder every family shares: a causal LM on our MoE block, parameter-for-parameter compatible with
transformers 5. A family gives an `Architecture` (what its layer differs in: framework/models/<family>/model.py).

Legend: B batch, S sequence, T = B*S tokens, H hidden, V vocabulary.
Owns: the decoder stack, the LM head, the losses (token cross-entropy + router aux/z losses). Attention, rotary
embedding and the dense MLP are transformers' own modules, so numerics and names follow upstream; RMSNorm is one fused
op with the same parameters (norm.py).
Single-process: no distributed imports.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from framework.models.attention import SUPPORTED_ATTENTION, document_boundaries, register_varlen_attention
from framework.models.family import MoELayout
from framework.models.options import ModelOptions
from framework.models.recompute import checkpoint_contexts
from framework.models.norm import RMSNorm
from framework.moe.aux_loss import RouterStats, load_balancing_loss, router_z_loss
from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter
from framework.ops.linear_cross_entropy import linear_cross_entropy_sum

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput(ModelOutput):
    """A dict as well as a dataclass (transformers' ModelOutput): DeepSpeed ZeRO-3 finds the tensors in it to hook."""

    logits: torch.Tensor | None = None  # [B, S, V]
    loss: torch.Tensor | None = None  # token CE (+ aux_loss_coef * aux_loss + z_loss_coef * z_loss) when labels given
    aux_loss: torch.Tensor | None = None  # load-balancing loss, pooled as transformers computes it or per layer
    z_loss: torch.Tensor | None = None  # router z-loss; computed only when z_loss_coef > 0 (ModelOptions)
    lm_loss: torch.Tensor | None = None  # token cross-entropy alone
    router_stats: list[RouterStats] | None = None


@dataclass(frozen=True)
class Architecture:
    """What one model family's decoder layer differs in; everything else (the MoE block, norms, losses, expert
    parallelism) is shared. Module classes are transformers' own, so parameter names and numerics follow upstream."""

    attention: type[nn.Module]  # (config, layer_idx); exposes head_dim
    rotary: type[nn.Module]  # (config=config)
    qk_norm: bool  # per-head RMSNorm on queries and keys (self_attn.q_norm / k_norm)
    layout: MoELayout  # which layers are MoE and their shape (the family's config.py; registry.layout_for)
    dense_mlp: Callable[[PretrainedConfig], nn.Module] | None = None  # for layers that are not MoE
    # the MoE block of a family whose router or shared experts differ: a MoEBlock subclass, built as
    # cls(config, options); None: `routed_block`
    moe_block: type[MoEBlock] | None = None
    # the attention implementations its attention module computes correctly with (attention.py SUPPORTED_ATTENTION)
    attention_implementations: tuple[str, ...] = SUPPORTED_ATTENTION


def routed_block(config: PretrainedConfig, options: ModelOptions, arch: Architecture) -> MoEBlock:
    """The MoE block of a family with a softmax top-k router and no shared experts (Qwen3-MoE, Mixtral)."""
    inter, num_experts, top_k, renormalise = arch.layout.moe_shape(config)
    router = TopKRouter(config.hidden_size, num_experts, top_k, renormalise)
    # nn.SiLU, which the fused SwiGLU recognises: each family's config check accepts hidden_act "silu" only
    return options.placement.block_class(MoEBlock)(config.hidden_size, inter, num_experts, router, nn.SiLU(),
                                                    options.backend, options.placement, options.z_loss_coef > 0)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, options: ModelOptions, arch: Architecture):
        super().__init__()
        self.self_attn = arch.attention(config, layer_idx)
        if arch.qk_norm:
            head_dim = self.self_attn.head_dim
            self.self_attn.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)  # fused, same parameter names
            self.self_attn.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        if arch.layout.is_moe_layer(config, layer_idx):
            self.mlp = (options.placement.block_class(arch.moe_block)(config, options) if arch.moe_block
                        else routed_block(config, options, arch))
        else:
            self.mlp = arch.dense_mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h_BSH, position_embeddings, attention_mask, token_mask_T, cu_seqlens=None,
                recompute: str | None = None):
        """recompute "attention" / "moe": checkpoint that half of the layer (the caller checkpoints whole layers)."""
        if recompute == "attention":
            attn_out = checkpoint(self._attention, h_BSH, position_embeddings, attention_mask, cu_seqlens,
                                  use_reentrant=False, context_fn=checkpoint_contexts)
        else:
            attn_out = self._attention(h_BSH, position_embeddings, attention_mask, cu_seqlens)
        h_BSH = h_BSH + attn_out
        if recompute == "moe":
            mlp_out, stats = checkpoint(self._mlp, h_BSH, token_mask_T, use_reentrant=False,
                                        context_fn=checkpoint_contexts)
        else:
            mlp_out, stats = self._mlp(h_BSH, token_mask_T)
        return h_BSH + mlp_out, stats

    def _attention(self, h_BSH, position_embeddings, attention_mask, cu_seqlens):
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}  # varlen attention's document boundaries
        attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(h_BSH),
                                     position_embeddings=position_embeddings, attention_mask=attention_mask, **extra)
        return attn_out

    def _mlp(self, h_BSH, token_mask_T):
        x = self.post_attention_layernorm(h_BSH)
        if isinstance(self.mlp, MoEBlock):
            return self.mlp(x, token_mask_T)
        return self.mlp(x), None


class DecoderStack(nn.Module):
    """Named `model` inside the causal LM, like transformers, so parameter names match."""

    def __init__(self, config: PretrainedConfig, options: ModelOptions, arch: Architecture):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i, options, arch)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = arch.rotary(config=config)


def causal_mask(attention_mask_BS: torch.Tensor | None, batch: int, seq: int, dtype: torch.dtype,
                device: torch.device, position_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Additive [B, 1, S, S] mask: causal, keys that are padding masked out (finite min avoids NaN rows), and, given
    position ids, block-diagonal over packed documents: a document starts wherever its position id is 0."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril().expand(batch, 1, seq, seq)
    if attention_mask_BS is not None:
        allowed = allowed & attention_mask_BS.bool()[:, None, None, :]
    if position_ids_BS is not None:
        doc_BS = (position_ids_BS == 0).cumsum(-1).expand(batch, seq)
        allowed = allowed & (doc_BS[:, None, :, None] == doc_BS[:, None, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class MoECausalLM(nn.Module):
    """The causal LM of every family; a family's subclass sets `architecture`."""

    architecture: Architecture

    def __init__(self, config: PretrainedConfig, options: ModelOptions = ModelOptions()):
        super().__init__()
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        if config._attn_implementation == "varlen":
            register_varlen_attention()
        supported = self.architecture.attention_implementations
        if config._attn_implementation not in supported:
            raise ValueError(f"attention implementation {config._attn_implementation!r} is not supported for "
                             f"{config.model_type}; expected one of {', '.join(supported)}")
        if options.router_bias_update_rate and not self.architecture.layout.router_selection_bias:
            raise ValueError(f"router_bias_update_rate {options.router_bias_update_rate}: {config.model_type} routers "
                             "have no selection bias (e_score_correction_bias); set it 0")
        self.config = config
        self.options = options
        self.model = DecoderStack(config, options, self.architecture)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self._tie_lm_head()
        # configs without router_aux_loss_coef (deepseek_v3: transformers computes no aux loss) default to 0
        default_coef = getattr(config, "router_aux_loss_coef", 0.0)
        self.aux_loss_coef = default_coef if options.aux_loss_coef is None else options.aux_loss_coef

    def _tie_lm_head(self) -> None:
        """tie_word_embeddings: lm_head.weight is embed_tokens.weight, one Parameter (named once by
        `named_parameters()`, so initialised, loaded, partitioned by ZeRO-3 and exported once, as the embedding)."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # nn.Module._apply (under to_empty, to, cuda, ...) makes a new Parameter per module whenever the new tensor
        # cannot replace the old one in place (meta -> real device: always), so a tie made in __init__ comes out as
        # two separate uninitialised tensors. Every re-materialisation goes through here: tie again.
        super()._apply(fn, recurse)
        self._tie_lm_head()
        return self

    def moe_blocks(self) -> list[MoEBlock]:
        return [m for m in self.modules() if isinstance(m, MoEBlock)]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """transformers' initialisation (normal(0, initializer_range) for matrices, ones for norms), drawn from one
        generator per parameter and per expert, so a rank holding a block of experts gets exactly that block."""
        std = self.config.initializer_range
        experts = {id(m.experts.gate_up_proj): m.experts for m in self.moe_blocks()}
        experts.update({id(m.experts.down_proj): m.experts for m in self.moe_blocks()})
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif id(p) in experts:
                first = experts[id(p)].first_expert
                for e in range(p.shape[0]):
                    p[e].normal_(0.0, std, generator=_generator(seed, f"{name}/{first + e}", p.device))
            else:
                p.normal_(0.0, std, generator=_generator(seed, name, p.device))
        pad = self.config.pad_token_id
        if pad is not None:
            self.model.embed_tokens.weight[pad].zero_()
        persistent = set(self.state_dict())
        for name, buf in self.named_buffers():
            if name in persistent:  # checkpointed buffers (a router's selection bias) start at 0, as transformers'
                buf.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """`position_ids` [B, S], when given, also mark packed documents: each 0 starts a document that attends only
        to itself (the trainer's packed batches); without them every row is one sequence."""
        batch, seq = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        packed_position_ids = position_ids
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        position_embeddings = self.model.rotary_emb(h, position_ids)
        cu_seqlens = None
        if self.config._attn_implementation == "varlen":
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("varlen attention takes packed documents (position_ids), not padding masks; use "
                                 "attn_implementation='sdpa' for padded batches")
            mask, cu_seqlens = None, document_boundaries(packed_position_ids, batch, seq, h.device)
            if cu_seqlens.numel() == batch + 1:
                cu_seqlens = None  # one document per row: the dense causal kernels (attention.py), faster than varlen
        elif attention_mask is None and packed_position_ids is None and self.config._attn_implementation == "sdpa":
            mask = None  # sdpa applies the causal mask itself (is_causal), the fast path
        else:
            mask = causal_mask(attention_mask, batch, seq, h.dtype, h.device, packed_position_ids)
        token_mask_T = None if attention_mask is None else attention_mask.reshape(-1)

        stats: list[RouterStats] = []
        recompute = self.options.activation_checkpointing if torch.is_grad_enabled() else False
        for layer in self.model.layers:
            if recompute is True:
                h, layer_stats = checkpoint(layer, h, position_embeddings, mask, token_mask_T, cu_seqlens,
                                            use_reentrant=False, context_fn=checkpoint_contexts)
            else:
                h, layer_stats = layer(h, position_embeddings, mask, token_mask_T, cu_seqlens, recompute or None)
            if layer_stats is not None:
                stats.append(layer_stats)
        h = self.model.norm(h)
        chunked = labels is not None and self.options.loss_chunk_tokens > 0
        logits = None if chunked else self.lm_head(h)

        out = CausalLMOutput(logits=logits, router_stats=stats)
        if stats:
            out.aux_loss = load_balancing_loss(stats, self.options.aux_loss_scope)
            out.z_loss = router_z_loss(stats)
        if labels is not None:
            out.lm_loss = (chunked_causal_lm_loss(h, self.lm_head, labels, self.options.loss_chunk_tokens) if chunked
                           else causal_lm_loss(logits, labels))
            out.loss = out.lm_loss
            if stats and self.aux_loss_coef:
                out.loss = out.loss + self.aux_loss_coef * out.aux_loss
            if stats and self.options.z_loss_coef:
                out.loss = out.loss + self.options.z_loss_coef * out.z_loss
        return out


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def chunked_causal_lm_loss(h_BSH: torch.Tensor, lm_head: "LMHead", labels_BS: torch.Tensor,
                           chunk: int) -> torch.Tensor:
    """causal_lm_loss without materialising the logits (framework/ops/linear_cross_entropy.py)."""
    shifted = F.pad(labels_BS, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    total = lm_head(h_BSH.reshape(-1, h_BSH.shape[-1]), labels_T=shifted, chunk=chunk)
    return total / (shifted != IGNORE_INDEX).sum().clamp_min(1)


class LMHead(nn.Linear):
    """nn.Linear (state dict `lm_head.weight`) that can also return the summed cross-entropy of its logits without
    materialising them. The loss is computed inside forward so that ZeRO-3's module hooks gather the weight for it."""

    def forward(self, h: torch.Tensor, labels_T: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        if labels_T is None:
            return super().forward(h)
        return linear_cross_entropy_sum(h, self.weight, labels_T, chunk)


def causal_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32, positions labelled -100 ignored (transformers' ForCausalLMLoss)."""
    shifted = F.pad(labels_BS, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)
