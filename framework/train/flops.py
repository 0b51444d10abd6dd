"""Model FLOPs per token and the hardware peak, for TFLOP/s/GPU and MFU.

Formula (the one Megatron and DeepSpeed's anchors use, so our figures compare with theirs): a training token costs
6 x the matmul parameters it touches (forward 2, backward 4), read off the family's model built on the meta device:
every matrix (attention projections, latent-attention down/up projections, routers, dense and shared-expert MLPs, the
LM head) except the embedding lookup, and of each MoE block's routed experts the top-k / E share; plus causal
attention 6 x S x heads x (qk_head_dim + v_head_dim) / 2 per layer (QK^T and AV, 2 S d each forward, halved by
causality, x3 for training; 6 x S x heads x head_dim where query and value heads are equally wide). Packed documents
are counted as if each row were one causal sequence, like the anchors. Embedding lookups, norms, biases and
activations are not counted. MFU = achieved model FLOP/s / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from framework.models.registry import meta_model, moe_shape

# Dense bf16 tensor-core peak per GPU in TFLOP/s (no sparsity), from the vendor data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.5, "H200": 989.5, "H800": 989.5, "GH200": 989.5, "A100": 312.0, "B200": 2250.0}


def matmul_params_per_token(model: torch.nn.Module) -> int:
    """The matrix elements one token multiplies with in a forward pass of a (meta) family model."""
    _, num_experts, top_k, _ = moe_shape(model.config)
    experts = {id(p) for block in model.moe_blocks() for p in block.experts.parameters()}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = model.lm_head.weight.numel()  # counted even when tied: the lookup is free, the LM head matmul is not
    for p in model.parameters():
        if p.dim() < 2 or id(p) in lookups or p is model.lm_head.weight:
            continue  # norms and biases (no matmul), the embedding lookup, the LM head (above)
        total += p.numel() // num_experts * top_k if id(p) in experts else p.numel()
    return total


def attention_score_flops(model: torch.nn.Module, seq_len: int) -> int:
    """Training FLOPs per token of QK^T and AV over all layers, causal (half the S x S products)."""
    heads = model.config.num_attention_heads
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn  # latent attention's queries/keys and values differ in width (qk_head_dim, v_head_dim)
        # (getattr's default would be evaluated first: DeepseekV3Attention has no head_dim)
        qk = getattr(attn, "qk_head_dim", None) or attn.head_dim
        v = getattr(attn, "v_head_dim", None) or attn.head_dim
        total += 3 * seq_len * heads * (qk + v)
    return total


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Model FLOPs of one training token for any registered family."""
    model = meta_model(config)
    return 6.0 * matmul_params_per_token(model) + float(attention_score_flops(model, seq_len))


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak if we know it (None on CPU or unknown GPUs: set train.peak_tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None
