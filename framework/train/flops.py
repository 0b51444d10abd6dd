"""Model FLOPs per token and the hardware peak, for TFLOP/s/GPU and MFU.

Formula (the one Megatron and DeepSpeed's anchors use, so our figures compare with theirs): a training token costs
6 x the matmul parameters it touches (forward 2, backward 4): per layer the attention projections (q/k/v/o, or MLA's
low-rank ones: the family's `Architecture.attention_shape`), and in MoE layers the top-k experts' three SwiGLU matrices,
the router and any shared experts with their gate (Qwen2-MoE, DeepSeek-V3; dense layers: their MLP); then the LM head;
plus causal attention 3 x S x (qk width + v width) per layer, widths = heads x head width (QK^T and AV, 2 S d each
forward, halved by causality, x3 for training: 6 x S x heads x head_dim where queries and values have one head width).
Packed documents are counted as if each row were one causal sequence, like the anchors. Embedding lookups, norms and
activations are not counted. MFU = achieved model FLOP/s / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from framework.models.registry import architecture_for

# Dense bf16 tensor-core peak per GPU in TFLOP/s (no sparsity), from the vendor data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.5, "H200": 989.5, "H800": 989.5, "GH200": 989.5, "A100": 312.0, "B200": 2250.0}


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Model FLOPs of one training token for any supported family (expert fields through its Architecture)."""
    arch = architecture_for(config)
    expert_width, num_experts, top_k, _ = arch.moe_shape(config)
    h = config.hidden_size
    attention = arch.attention_shape(config)
    matmul_params = h * config.vocab_size  # LM head
    for layer in range(config.num_hidden_layers):
        matmul_params += attention.matmul_params
        if arch.is_moe_layer(config, layer):
            matmul_params += top_k * 3 * h * expert_width + h * num_experts
            if arch.shared_expert_params is not None:
                matmul_params += arch.shared_expert_params(config)
        else:
            matmul_params += 3 * h * config.intermediate_size
    scores = 3.0 * config.num_hidden_layers * seq_len * (attention.qk_width + attention.v_width)
    return 6.0 * matmul_params + scores


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak if we know it (None on CPU or unknown GPUs: set train.peak_tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None
