"""Per-family test cases, keyed by config.json model_type: a family joins the family-parametrized tests (checkpoint
conversion, parameter counts) by adding its entry here. Tests parametrize over the registry
(framework/models/registry.py FAMILIES) and look their family up in these tables, so a registered family without an
entry fails rather than being left out."""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = os.path.join(REPO, "model_configs")

# Tiny stock configs (transformers' own field names) for the conversion round trips. Widths: H != I and H != 2I, so
# a gate/up swap or a missing transpose cannot pass by shape. Between them they cover dense layers among MoE layers
# (qwen3_moe, qwen2_moe, deepseek_v3), tied embeddings (mixtral), shared experts (qwen2_moe, deepseek_v3) and a
# persistent buffer (deepseek_v3).
TINY_STOCK_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                      num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=64, norm_topk_prob=True,
                      tie_word_embeddings=False),
    "mixtral": dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=64, tie_word_embeddings=True),
    # shared expert with its gate, a dense middle layer, q/k/v bias
    "qwen2_moe": dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                      shared_expert_intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], qkv_bias=True,
                      max_position_embeddings=64, tie_word_embeddings=False),
    "olmoe": dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=1, eos_token_id=2),
    # multi-head latent attention (q_lora_rank set, qk 8 + 8 != v 8), a dense first layer, shared experts, grouped
    # sigmoid routing with its e_score_correction_bias buffer (a non-expert tensor the tools pass through)
    "deepseek_v3": dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False),
}

# Real-shape run configs under model_configs/ (model.hf_config from each model's public config.json), for the
# parameter count against stock transformers. Families registered only on other branches have their entries already;
# tests/unit/test_param_counts.py checks that every YAML belongs to a registered family.
REAL_SHAPE_CONFIGS: dict[str, list[str]] = {
    "qwen3_moe": ["qwen3-30b-a3b.yaml", "qwen3-235b-a22b.yaml"],
    "mixtral": ["mixtral-8x7b.yaml"],
    "qwen2_moe": ["qwen1.5-moe-a2.7b.yaml", "qwen2-57b-a14b.yaml"],
    "olmoe": ["olmoe-1b-7b.yaml"],
    "deepseek_v3": ["moonlight-16b-a3b.yaml", "deepseek-v3.yaml"],
}
