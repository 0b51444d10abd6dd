"""Activation memory of one training step of our decoder (any registered family's widths, framework/tuning/params.py
ModelShape), from the tensors autograd keeps (bf16 model).

Legend: B micro batch, S sequence, T = B*S tokens, H hidden, Q = heads x head_dim, KV = kv_heads x head_dim,
I expert FFN, Id dense FFN, E experts, K top-k, V vocabulary, L layers.
Owns: bytes per token of every tensor saved for backward, layer by layer (framework/models/decoder.py with
transformers' attention of the family (Qwen3-MoE's with q/k norms), torch's fused rms_norm, framework/moe/: router,
torch dispatch, grouped-GEMM SwiGLU experts, bmm combine), the loss (cross-entropy on logits.float()), and the peaks
of three moments of a step:
  loss            the LM head's backward: fp32 log-probabilities and their gradients, the largest transient;
  layer_backward  one decoder layer's backward (with checkpointing: recomputed, so all of its activations at once);
  optimizer_step  the trainer still holds the step's output, so the bf16 logits live through engine.step().
Saved-tensor lists were checked op by op with torch.autograd.graph.saved_tensors_hooks on a real layer. The counts
are those of the CUDA kernels (the estimate is of a GPU run): on CPU, rms_norm is composite and saves more.
Assumes balanced routing (each rank's experts get T*K rows); a skewed router adds rows on the busiest rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from framework.tuning.params import ModelShape

BF16, FP32, INT64 = 2, 4, 8
ATTENTION_KINDS = ("varlen", "sdpa", "eager")


def rmsnorm_saved(width: int) -> int:
    """Per normalised row: torch's fused CUDA rms_norm keeps its bf16 input and one fp32 rstd."""
    return BF16 * width + FP32


def varlen_takes_gqa() -> bool:
    """framework/models/attention.py passes enable_gqa where torch's varlen_attn accepts it (torch 2.13)
    and repeats k, v to all heads otherwise; the estimate follows the torch installed here."""
    from framework.models.attention import varlen_parameters  # noqa: PLC0415

    return "enable_gqa" in varlen_parameters()


def _kv_width_at_kernel(s: ModelShape, attention: str) -> int:
    # varlen over rows of one document each runs sdpa with GQA (attention.py): never repeated, so on a torch whose
    # varlen kernel repeats k, v this is an upper bound for such batches (random-token benchmarks).
    return s.kv_width if attention == "varlen" and varlen_takes_gqa() else s.q_width


def attention_saved(s: ModelShape, attention: str, seq: int) -> int:
    """Bytes per token kept by one attention block."""
    per_token = rmsnorm_saved(s.hidden) + BF16 * s.hidden  # input norm; its output is saved by q/k/v projections
    if s.qk_norm:
        per_token += s.heads * rmsnorm_saved(s.head_dim) + s.kv_heads * rmsnorm_saved(s.head_dim)  # q_norm, k_norm
    # The kernel keeps q, k, v and its output, which o_proj also keeps (same storage). k and v come repeated to all
    # heads (repeat_kv materialises them) except for varlen on a torch whose kernel takes GQA. RoPE keeps nothing:
    # cos/sin need no gradient, so q * cos saves only cos.
    per_token += 2 * BF16 * s.q_width + 2 * BF16 * _kv_width_at_kernel(s, attention)
    if attention == "eager":
        per_token += (FP32 + BF16) * s.heads * seq  # softmax output in fp32, its bf16 copy for probs @ v
    else:
        per_token += FP32 * s.heads  # log-sum-exp of the flash / memory-efficient kernels
    return per_token


def ranks_per_token(s: ModelShape, ep_size: int) -> float:
    """Expected number of EP ranks a token's top-k experts live on, for uniform routing: each rank misses all k
    with probability C(E - E/ep, k) / C(E, k)."""
    miss = math.comb(s.num_experts - s.num_experts // ep_size, s.top_k) / math.comb(s.num_experts, s.top_k)
    return ep_size * (1 - miss)


def moe_saved(s: ModelShape, ep_size: int, z_loss: bool = False) -> int:
    """Bytes per token kept by one MoE block (router, dispatch, SwiGLU experts on T*K rows, combine); `z_loss`: the
    run's z_loss_coef > 0, when the router statistics also compute the z-loss."""
    h, k, e, inter = s.hidden, s.top_k, s.num_experts, s.moe_intermediate
    per_token = rmsnorm_saved(h) + BF16 * h  # post-attention norm; its output is saved by the router
    # softmax probs fp32 [T,E]; top-k ids, values, their sum; with a z-loss, its logits.float() [T,E] and
    # logsumexp [T].
    per_token += FP32 * e + INT64 * k + FP32 * k + FP32
    if z_loss:
        per_token += FP32 * e + FP32
    if ep_size == 1:
        per_token += INT64 * k  # the inverse of the sort order (dispatch backward and combine)
    else:
        # framework/parallel/ep_dispatch.py: the [T, ep] pair index; per (token, rank) pair (sent, and on average
        # as many received) its token id, the [K] expert-row index and the bool slot mask; per expert row the slot
        # its weight was picked from.
        per_token += INT64 * ep_size + round(ranks_per_token(s, ep_size) * (INT64 + k * (INT64 + 1))) + INT64 * k
    per_token += BF16 * k * h  # expert-sorted rows, input of the first grouped GEMM
    # gate_up [R,2I] and the rows' bf16 routing weights [R] (the fused SwiGLU's saved inputs), and
    # silu(gate)*up*weight [R,I] (input of the second GEMM). The combine keeps nothing: the weights are applied
    # before the second GEMM (framework/ops/swiglu.py).
    per_token += BF16 * k * 2 * inter + BF16 * k + BF16 * k * inter
    return per_token


def dense_mlp_saved(s: ModelShape) -> int:
    """Bytes per token kept by a dense SwiGLU MLP layer (mlp_only_layers): gate, silu(gate), up, silu*up."""
    return rmsnorm_saved(s.hidden) + BF16 * s.hidden + 4 * BF16 * s.dense_intermediate


def mlp_saved(s: ModelShape, layer: int, ep_size: int, z_loss: bool = False) -> int:
    return moe_saved(s, ep_size, z_loss) if s.moe_layers[layer] else dense_mlp_saved(s)


def layer_saved(s: ModelShape, layer: int, attention: str, seq: int, ep_size: int, z_loss: bool = False) -> int:
    return attention_saved(s, attention, seq) + mlp_saved(s, layer, ep_size, z_loss)


def layer_backward_workspace(s: ModelShape, layer: int, attention: str, seq: int) -> int:
    """Bytes per token of gradients alive at once inside a layer's backward, beyond its saved activations.
    Attention: grad of the output, then grads of q and repeated k, v while the kernel's inputs are still held.
    MoE: grad of the block output and grad of the K expert outputs per token (the bmm frees its saved rows only after
    the permute's gradient exists)."""
    attn = 2 * BF16 * s.q_width + 2 * BF16 * _kv_width_at_kernel(s, attention)
    attn += (FP32 + BF16) * s.heads * seq if attention == "eager" else 0
    if s.moe_layers[layer]:
        mlp = BF16 * s.hidden + BF16 * s.top_k * s.hidden
    else:
        mlp = BF16 * s.hidden + 2 * BF16 * s.dense_intermediate
    return max(attn, mlp)


def loss_backward_peak(s: ModelShape) -> int:
    """Bytes per token at the cross-entropy's backward: bf16 logits, fp32 log-softmax output (kept by log_softmax),
    the fp32 gradient nll_loss writes, and log_softmax's fp32 input gradient: (2 + 4 + 4 + 4) x V."""
    return (BF16 + 3 * FP32) * s.vocab


def chunked_loss_peak(s: ModelShape, chunk: int, tokens: int) -> int:
    """Bytes at the fused LM head + cross-entropy (framework/ops/linear_cross_entropy.py, CUDA path): one chunk's
    bf16 logits (turned into the softmax gradient in place), the input gradient [T, H] bf16 and the fp32 weight
    gradient [V, H] (cuBLAS accumulates into it)."""
    return chunk * BF16 * s.vocab + tokens * BF16 * s.hidden + FP32 * s.vocab * s.hidden


def final_norm_saved(s: ModelShape) -> int:
    return rmsnorm_saved(s.hidden) + BF16 * s.hidden  # the final norm, and its output kept by lm_head


def mask_bytes(micro_batch: int, seq: int, attention: str) -> int:
    """sdpa and eager get an explicit additive [B, 1, S, S] bf16 mask for packed documents; varlen needs none."""
    return 0 if attention == "varlen" else BF16 * micro_batch * seq * seq


@dataclass(frozen=True)
class ActivationPeaks:
    """Activation bytes (per GPU) at the three moments of a step; see the module docstring."""

    loss: int
    layer_backward: int
    optimizer_step: int

    @property
    def peak(self) -> int:
        return max(self.loss, self.layer_backward, self.optimizer_step)


CHECKPOINTING_MODES = (True, "moe", "attention", False)  # train.activation_checkpointing's values


def activation_peaks(s: ModelShape, micro_batch: int, seq: int, checkpointing: bool | str, attention: str,
                     ep_size: int, loss_chunk_tokens: int = 0, z_loss: bool = False) -> ActivationPeaks:
    """checkpointing: True (whole layers recomputed), "moe" / "attention" (that half of each layer recomputed, the
    other half's activations kept) or False. z_loss: the run's z_loss_coef > 0 (the router statistics then hold the
    z-loss graph)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION_KINDS)}")
    if checkpointing not in CHECKPOINTING_MODES:
        raise ValueError(f"activation checkpointing {checkpointing!r}: expected true, false, moe or attention")
    tokens = micro_batch * seq
    layers = range(s.num_layers)
    attn = [attention_saved(s, attention, seq)] * s.num_layers
    mlp = [mlp_saved(s, i, ep_size, z_loss) for i in layers]
    workspace = [layer_backward_workspace(s, i, attention, seq) for i in layers]
    # rotary cos/sin [B,S,head_dim] bf16 and the mask live through forward and backward
    common = tokens * 2 * BF16 * s.head_dim + mask_bytes(micro_batch, seq, attention)
    logits = tokens * BF16 * s.vocab  # CausalLMOutput.logits, held by the trainer until the next micro batch
    loss_peak = tokens * loss_backward_peak(s)
    if loss_chunk_tokens > 0:  # train.loss_chunk_tokens: no logits are returned, one chunk's logits at a time
        logits, loss_peak = 0, chunked_loss_peak(s, min(loss_chunk_tokens, tokens), tokens)
    # with z_loss_coef > 0, out.z_loss's graph (logsumexp's fp32 logits) lives as long as the output does (inside a
    # recomputed layer it is not kept); without it the statistic is not computed
    z_graph = tokens * s.num_moe_layers * (FP32 * s.num_experts + FP32) if z_loss else 0
    checkpoint_input = BF16 * s.hidden  # a non-reentrant checkpoint keeps its [B,S,H] input
    if checkpointing is False:
        kept, recomputed, optimizer_step = [a + m for a, m in zip(attn, mlp)], [], logits + z_graph
    elif checkpointing is True:
        kept, recomputed, optimizer_step = [checkpoint_input] * s.num_layers, [a + m for a, m in zip(attn, mlp)], logits
    elif checkpointing == "moe":
        kept, recomputed, optimizer_step = [a + checkpoint_input for a in attn], mlp, logits
    else:
        kept, recomputed, optimizer_step = [m + checkpoint_input for m in mlp], attn, logits + z_graph
    stored = tokens * sum(kept)
    # backward: one layer's (or one half's) recomputed activations at once, beside the gradients of that layer;
    # without recomputation the last layer's backward comes first, with everything still stored
    one_layer = tokens * (workspace[-1] if checkpointing is False else
                          max(r + w for r, w in zip(recomputed, workspace)))
    return ActivationPeaks(
        loss=common + stored + tokens * final_norm_saved(s) + loss_peak,
        layer_backward=common + stored + logits + one_layer,
        optimizer_step=optimizer_step)
