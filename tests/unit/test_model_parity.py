"""Our Qwen3-MoE against stock transformers 5 (eager experts) with the same weights, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

import framework
from tests.helpers import batch, rel_err, stock_model

TOL = 1e-5


def ours_from(stock: Qwen3MoeForCausalLM, backend: str, attn: str, **options) -> framework.Qwen3MoeCausalLM:
    model = framework.load_model(stock.config, backend=backend, attn_implementation=attn, **options)
    result = model.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def test_state_dicts_interchange():
    stock = stock_model()
    ours = framework.load_model(stock.config, backend="eager", seed=3)
    ours_sd, stock_sd = ours.state_dict(), stock.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in stock_sd.items()}
    fresh = Qwen3MoeForCausalLM(stock.config)
    res = fresh.load_state_dict(ours_sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours_sd[k]), k
    assert type(ours.model.layers[1].mlp).__name__ == "Qwen3MoeMLP"  # mlp_only_layers stays dense
    assert type(ours.model.layers[0].mlp).__name__ == "MoEBlock"


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("attn,padded", [("eager", True), ("sdpa", True), ("sdpa", False)])
def test_logits_loss_aux_and_grads_match_transformers(backend, attn, padded):
    stock = stock_model(attn=attn)
    ours = ours_from(stock, backend, attn)
    ids, mask, labels = batch(pad_right=padded)
    mask_arg = mask if padded else None

    ref = stock(input_ids=ids, attention_mask=mask_arg, labels=labels, output_router_logits=True)
    ref.loss.backward()
    out = ours(ids, attention_mask=mask_arg, labels=labels)
    out.loss.backward()

    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.aux_loss, ref.aux_loss) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert out.aux_loss.item() > 1.0  # balanced routing gives top_k = 2; a zero aux loss would pass trivially
    ref_grads = dict(stock.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert rel_err(p.grad, g_ref) <= TOL, (name, rel_err(p.grad, g_ref))
        checked += 1
    assert checked == len(ref_grads)


def test_aux_loss_coefficient_and_z_loss_enter_the_loss():
    stock = stock_model()
    ours = ours_from(stock, "grouped_mm", "eager")
    ids, mask, labels = batch()
    base = ours(ids, attention_mask=mask, labels=labels)
    assert torch.allclose(base.loss, base.lm_loss + 0.02 * base.aux_loss)
    # z_loss_coef 0: the blocks compute no z statistic at all
    assert base.z_loss is None and all(s.z_sum is None for s in base.router_stats)
    ours = ours_from(stock, "grouped_mm", "eager", aux_loss_coef=0.0, z_loss_coef=0.5)
    z = ours(ids, attention_mask=mask, labels=labels)
    # independent z-loss: mean over real tokens and MoE layers of logsumexp(router logits)^2
    hidden = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: hidden.__setitem__(i, a[0]))
             for i, blk in enumerate(ours.moe_blocks())]
    ours(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    zs = []
    for i, blk in enumerate(ours.moe_blocks()):
        logits = hidden[i].reshape(-1, 32) @ blk.gate.weight.T
        zs.append(torch.logsumexp(logits, -1).square()[mask.reshape(-1).bool()])
    expected = torch.cat(zs).mean()
    assert rel_err(z.z_loss, expected) <= TOL
    assert torch.allclose(z.loss, z.lm_loss + 0.5 * expected, rtol=1e-6)


def test_bf16_forward_close_to_fp32():
    stock = stock_model()
    ours32 = ours_from(stock, "grouped_mm", "sdpa")
    ours16 = framework.load_model(stock.config, backend="grouped_mm", dtype=torch.bfloat16)
    ours16.load_state_dict(stock.state_dict())
    ids, _, labels = batch(pad_right=False)
    out32, out16 = ours32(ids, labels=labels), ours16(ids, labels=labels)
    assert out16.logits.dtype == torch.bfloat16
    assert rel_err(out16.logits.float(), out32.logits) < 3e-2
    assert abs(out16.loss.item() - out32.loss.item()) < 2e-2 * out32.loss.item()


def test_per_layer_aux_loss_equals_transformers_formula_per_layer():
    """moe.aux_loss_scope=per_layer: the mean over MoE layers of transformers' loss computed on that layer's router
    logits alone (stock load_balancing_loss_func, one layer at a time)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    stock = stock_model()
    ours = ours_from(stock, "grouped_mm", "eager", aux_loss_scope="per_layer")
    ids, mask, labels = batch()
    out = ours(ids, attention_mask=mask, labels=labels)
    ref = stock(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    cfg = stock.config
    per_layer = [load_balancing_loss_func((logits,), cfg.num_experts, cfg.num_experts_per_tok, mask)
                 for logits in ref.router_logits]
    want = torch.stack(per_layer).mean()
    assert rel_err(out.aux_loss, want) <= TOL
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) > 1e-6  # not the pooled value by accident


def test_per_layer_aux_loss_sees_a_collapse_the_pooled_loss_misses():
    from framework.moe.aux_loss import RouterStats, load_balancing_loss

    def layer(expert: int) -> RouterStats:  # every token's single choice (and all probability) on one expert of 4
        counts = torch.zeros(4)
        counts[expert] = 10.0
        return RouterStats(counts, counts.clone(), torch.tensor(0.0), torch.tensor(10.0))

    collapsed = [layer(e) for e in range(4)]  # each layer collapsed onto a different expert
    assert load_balancing_loss(collapsed, "pooled").item() == pytest.approx(1.0)  # looks perfectly balanced (top_k)
    assert load_balancing_loss(collapsed, "per_layer").item() == pytest.approx(4.0)  # E x top_k: fully collapsed
    with pytest.raises(ValueError, match="pooled or per_layer"):
        load_balancing_loss(collapsed, "global")
