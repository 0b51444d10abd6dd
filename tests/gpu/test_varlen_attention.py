"""Flash varlen attention over packed documents equals the block-diagonal-mask path (GPU, bf16).

Rows holding one document each take the dense causal kernels (cuDNN first) instead; same bound. The bf16 paths are
compared with an fp32 block-diagonal-mask run of the same weights: varlen's error (logits, loss, every gradient) must
stay within 2x the masked sdpa path's bf16 error + 1e-3. The kernel alone is checked against fp32 attention
computed document by document, on layouts with different document counts one after another and a document of one
token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import framework
from framework.models.attention import _varlen_attention_forward, varlen_attention_available

pytestmark = pytest.mark.gpu
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False)
# the same run through the other families' attention modules (transformers' Qwen2MoeAttention with q/k/v bias,
# OlmoeAttention with its whole-width q/k norm and clip_qkv; OLMoE's head_dim is hidden / heads)
CONFIGS = {
    "qwen3_moe": CONFIG,
    "qwen2_moe": {**CONFIG, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 384, "mlp_only_layers": [],
                  "norm_topk_prob": False},
    "olmoe": {**{k: v for k, v in CONFIG.items() if k not in ("moe_intermediate_size", "head_dim")},
              "model_type": "olmoe", "intermediate_size": 128, "clip_qkv": 4.0, "eos_token_id": 2},
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(attn: str, dtype: torch.dtype, ids, pos, family: str = "qwen3_moe"):
    model = framework.load_model(dict(CONFIGS[family]), backend="grouped_mm", attn_implementation=attn, dtype=dtype,
                                 device="cuda", seed=0)
    out = model(ids, labels=ids, position_ids=pos)
    out.loss.backward()
    return out.logits.float(), out.loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def skip_without_varlen() -> None:
    if not varlen_attention_available():
        pytest.skip("torch.nn.attention.varlen is not available")


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[[300, 500, 224], [1024]], [[1024], [1024]]],
                         ids=["packed-flash-varlen", "one-document-per-row-dense-cudnn"])
def test_varlen_matches_masked_sdpa(lengths, family):
    """Several documents in a row run flash varlen; rows of one document each run the dense causal kernels."""
    skip_without_varlen()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 1024), generator=g).cuda()
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths]).cuda()
    ref_logits, ref_loss, ref_grads = run("sdpa", torch.float32, ids, pos, family)
    sdpa_logits, sdpa_loss, sdpa_grads = run("sdpa", torch.bfloat16, ids, pos, family)
    var_logits, var_loss, var_grads = run("varlen", torch.bfloat16, ids, pos, family)
    assert rel(var_logits, ref_logits) <= 2 * rel(sdpa_logits, ref_logits) + 1e-3
    assert abs(var_loss - ref_loss) <= 2 * abs(sdpa_loss - ref_loss) + 1e-3
    worst = max((rel(var_grads[n], g) - 2 * rel(sdpa_grads[n], g), n) for n, g in ref_grads.items())
    assert worst[0] <= 1e-3, worst
    print(f"logits rel err vs fp32: varlen {rel(var_logits, ref_logits):.2e}, masked sdpa {rel(sdpa_logits, ref_logits):.2e}")


def reference_attention(q, k, v, cu, scale):
    """fp32 causal attention document by document; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs), (q, k, v)


def test_packed_kernel_matches_fp32_per_document():
    """Three layouts in a row (3, 9 and 2 documents over 2 x 512 tokens, one of a single token): out, dq, dk, dv of
    the bf16 kernel within 1e-2 (relative; bf16 inputs) of fp32 attention computed per document."""
    skip_without_varlen()
    batch, seq, heads, kv_heads, dim = 2, 512, 8, 2, 128
    scale = dim**-0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    for lengths in ([300, 212, 512], [1, 63, 64, 128, 100, 156, 200, 112, 200], [512, 512]):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(batch, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g,
                        requires_grad=True)
        v = torch.randn(batch, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g,
                        requires_grad=True)
        dy = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        flat = [t.detach().transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (q, k, v)]
        ref, ref_inputs = reference_attention(*flat, cu, scale)
        ref.backward(dy.reshape(batch * seq, heads, dim).float())
        want = [ref.detach().view(batch, seq, heads, dim)]
        want += [t.grad.reshape(batch, seq, -1, dim).transpose(1, 2) for t in ref_inputs]
        out, _ = _varlen_attention_forward(None, q, k, v, None, scaling=scale, cu_seqlens=cu)
        out.backward(dy)
        errors = [rel(got, w) for got, w in zip([out, q.grad, k.grad, v.grad], want)]
        assert max(errors) <= 1e-2, (lengths, errors)
