"""MLA (deepseek_v3: value heads narrower than query/key heads) under the varlen attention implementation equals the
block-diagonal-mask path (GPU, bf16), as tests/gpu/test_varlen_attention.py checks for Qwen3-MoE: the value heads are
zero-padded to the query width for the flash varlen kernel and the output sliced back (framework/models/attention.py).
"""

from __future__ import annotations

import pytest
import torch

import framework
from framework.models.attention import varlen_attention_available

pytestmark = pytest.mark.gpu
CONFIG = dict(model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=512,
              moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
              first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=128,
              q_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
              max_position_embeddings=2048, tie_word_embeddings=False)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(attn: str, dtype: torch.dtype, ids, pos):
    model = framework.load_model(dict(CONFIG), backend="grouped_mm", attn_implementation=attn, dtype=dtype,
                                 device="cuda", seed=0)
    out = model(ids, labels=ids, position_ids=pos)
    out.loss.backward()
    return out.logits.float(), out.loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lengths", [[[300, 500, 224], [1024]], [[1024], [1024]]],
                         ids=["packed-flash-varlen", "one-document-per-row-dense"])
def test_mla_varlen_matches_masked_sdpa(lengths):
    if not varlen_attention_available():
        pytest.skip("torch.nn.attention.varlen is not available")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 1024), generator=g).cuda()
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths]).cuda()
    ref_logits, ref_loss, ref_grads = run("sdpa", torch.float32, ids, pos)
    sdpa_logits, sdpa_loss, sdpa_grads = run("sdpa", torch.bfloat16, ids, pos)
    var_logits, var_loss, var_grads = run("varlen", torch.bfloat16, ids, pos)
    assert var_logits.shape == ref_logits.shape
    assert rel(var_logits, ref_logits) <= 2 * rel(sdpa_logits, ref_logits) + 1e-3
    assert abs(var_loss - ref_loss) <= 2 * abs(sdpa_loss - ref_loss) + 1e-3
    worst = max((rel(var_grads[n], g) - 2 * rel(sdpa_grads[n], g), n) for n, g in ref_grads.items())
    assert worst[0] <= 1e-3, worst
    print(f"logits rel err vs fp32: varlen {rel(var_logits, ref_logits):.2e}, masked sdpa "
          f"{rel(sdpa_logits, ref_logits):.2e}")
