"""DeepSeek-V3 (model_type deepseek_v3) on our MoE layer against stock transformers 5 (eager experts), fp32 on CPU:
MLA attention, dense first layer, group-limited sigmoid routing with a selection bias, shared experts."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import framework
from framework.models.registry import FAMILIES, family_for
from framework.moe.router import GroupLimitedSigmoidRouter
from tests.helpers import assert_state_dicts_interchange, batch, rel_err, spread_weights, write_hub_per_expert

TOL = 1e-5
# H != I != moe I, multiples of 8 for _grouped_mm strides; 8 experts in 4 groups, 2 groups kept, top-3; qk head width
# (16 + 8) != v head width (8); the first layer dense.
TINY_DEEPSEEK = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                     num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
                     routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24,
                     qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8, max_position_embeddings=64,
                     tie_word_embeddings=False)
MOONLIGHT_LIKE = dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=True)  # Moonlight: q_proj, 1 group
SHAPES = {"q_lora": {}, "moonlight": MOONLIGHT_LIKE}


def stock_deepseek(attn: str = "eager", **overrides) -> DeepseekV3ForCausalLM:
    """Stock model with spread weights and a random selection bias (so biased and unbiased top-k differ)."""
    torch.manual_seed(0)
    config = DeepseekV3Config(**{**TINY_DEEPSEEK, **overrides})
    config._attn_implementation = attn
    config._experts_implementation = "eager"
    model = spread_weights(DeepseekV3ForCausalLM(config).float())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.3)
    return model


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    stock = stock_deepseek(**SHAPES[request.param])
    hub = str(tmp_path_factory.mktemp(f"deepseek_{request.param}") / "hub")
    write_hub_per_expert(stock, hub)
    return stock, hub


def test_hub_layout_is_what_transformers_reads(checkpoint):
    stock, hub = checkpoint
    reloaded, info = DeepseekV3ForCausalLM.from_pretrained(hub, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_bias_changes_the_selection(checkpoint):
    """The random bias must matter, or a router that ignored it would pass the parity tests."""
    stock, _ = checkpoint
    gate = stock.model.layers[1].mlp.gate
    x = torch.randn(64, stock.config.hidden_size)
    _, _, biased = gate(x)
    with torch.no_grad():
        saved = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, plain = gate(x)
        gate.e_score_correction_bias.copy_(saved)
    assert not torch.equal(biased.sort(-1)[0], plain.sort(-1)[0])


def test_family_and_modules():
    stock = stock_deepseek()
    assert family_for(stock.config) is FAMILIES["deepseek_v3"]
    ours = framework.load_model(stock.config, backend="eager")
    assert type(ours).__name__ == "DeepseekV3CausalLM"
    layers = ours.model.layers
    assert type(layers[0].mlp).__name__ == "DeepseekV3MLP"  # first_k_dense_replace = 1
    assert type(layers[1].mlp.shared_experts).__name__ == "DeepseekV3MLP"
    assert type(layers[1].self_attn).__name__ == "DeepseekV3Attention"
    assert layers[1].mlp.shared_experts.intermediate_size == 24 * 2
    assert isinstance(layers[1].mlp.gate, GroupLimitedSigmoidRouter)
    assert torch.equal(layers[1].mlp.gate.e_score_correction_bias, torch.zeros(8))  # initialised as transformers


def test_state_dicts_interchange():
    stock = stock_deepseek()
    ours = framework.load_model(stock.config, backend="eager", seed=3)
    ours_sd, stock_sd = ours.state_dict(), stock.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in stock_sd.items()}
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in ours_sd
    with torch.no_grad():
        for name, buf in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape))
    assert_state_dicts_interchange(ours, DeepseekV3ForCausalLM, stock.config, stock_sd)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ours, stock) -> None:
    got, want = _grads(ours), _grads(stock)
    assert set(got) == set(want) == {n for n, _ in stock.named_parameters()}
    for name, g in want.items():
        assert rel_err(got[name], g) <= TOL, name


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_transformers_padded(checkpoint, backend, attn):
    stock, hub = checkpoint
    stock.config._attn_implementation = attn
    stock.zero_grad()
    ours = framework.load_model(hub, backend=backend, attn_implementation=attn)
    for k, v in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ids, mask, labels = batch(pad_right=True)
    ref = stock(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert ref.aux_loss is None  # transformers computes no auxiliary loss for deepseek_v3: nor does our loss
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert torch.equal(out.loss, out.lm_loss)
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(ours, stock)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_matches_transformers_packed(checkpoint, backend):
    """Packed documents (position ids restarting at 0) against stock run on each document alone: our block-diagonal
    mask keeps them apart in MLA attention."""
    stock, hub = checkpoint
    stock.config._attn_implementation = "sdpa"
    stock.zero_grad()
    ours = framework.load_model(hub, backend=backend, attn_implementation="sdpa")
    ids = batch(bsz=1, seq=12, pad_right=False)[0]
    lengths = [5, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out = ours(ids, position_ids=pos, labels=ids)
    ref_logits = torch.cat([stock(input_ids=d).logits for d in ids.split(lengths, dim=1)], dim=1)
    ref_loss = F.cross_entropy(ref_logits[0, :-1], ids[0, 1:])  # our labels shift across documents too
    assert rel_err(out.logits, ref_logits) <= TOL
    assert rel_err(out.lm_loss, ref_loss) <= TOL
    ref_loss.backward()
    out.loss.backward()
    _assert_same_grads(ours, stock)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_all_tokens_on_one_expert(tmp_path, backend):
    """top-1 with a bias that outweighs every score: every token on expert 5, the other 7 experts empty. Not
    renormalised: a renormalised top-1 weight is s / (s + 1e-20), whose router gradient is ~1e-20 (noise)."""
    stock = stock_deepseek(num_experts_per_tok=1, norm_topk_prob=False)
    with torch.no_grad():
        for name, buf in stock.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
                buf[5] = 10.0
    write_hub_per_expert(stock, str(tmp_path))
    ours = framework.load_model(str(tmp_path), backend=backend)
    ids, mask, labels = batch(pad_right=True)
    ref = stock(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    for stats in out.router_stats:
        assert stats.tokens_per_expert[5] == mask.sum() and stats.tokens_per_expert.sum() == mask.sum()
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(ours, stock)


def test_bias_stays_fp32_under_bf16():
    """transformers keeps e_score_correction_bias in fp32 (_keep_in_fp32_modules_strict); so do we, unrounded."""
    stock = stock_deepseek()
    ours = framework.load_model(stock.config, backend="eager")
    ours.load_state_dict(stock.state_dict())
    ours.to(torch.bfloat16)
    for name, buf in ours.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert buf.dtype == torch.float32
            assert torch.equal(buf, stock.state_dict()[name])


@pytest.mark.parametrize("field, value, message", [
    ("n_group", 3, "n_group (3) must divide n_routed_experts (8)"),
    ("topk_group", 5, "topk_group (5) must be between 1 and n_group (4)"),
    ("num_experts_per_tok", 5, "num_experts_per_tok (5) must be between 1 and the 4 experts of topk_group groups"),
    ("num_key_value_heads", 2, "num_key_value_heads (2) must equal num_attention_heads (4)"),
    ("scoring_func", "softmax", "scoring_func is 'softmax'; deepseek_v3 routes with 'sigmoid'"),
    ("hidden_act", "gelu", "hidden_act is 'gelu'"),
])
def test_bad_configs_fail_in_one_line(field, value, message):
    with pytest.raises(ValueError) as err:
        framework.load_model({**TINY_DEEPSEEK, "model_type": "deepseek_v3", field: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_fields_are_named():
    raw = {k: v for k, v in TINY_DEEPSEEK.items() if k not in ("q_lora_rank", "n_routed_experts")}
    with pytest.raises(ValueError, match="missing required DeepSeek-V3 field.*q_lora_rank, n_routed_experts"):
        framework.load_model({**raw, "model_type": "deepseek_v3"})
    # transformers 5's spelling of the expert count is accepted
    ours = framework.load_model({**{k: v for k, v in TINY_DEEPSEEK.items() if k != "n_routed_experts"},
                                 "model_type": "deepseek_v3", "num_local_experts": 8})
    assert ours.config.n_routed_experts == 8
    with pytest.raises(ValueError, match="n_routed_experts=8 and num_local_experts=6 disagree"):
        framework.load_model({**TINY_DEEPSEEK, "model_type": "deepseek_v3", "num_local_experts": 6})


@pytest.mark.parametrize("q_lora_rank, expected", [(24, 316416), (8, 279552), (None, 316416)])
def test_flops_per_token_by_hand(q_lora_rank, expected):
    """MLA projections and shared experts counted by hand (TINY_DEEPSEEK: H 32, 4 heads, qk 16+8, v 8, kv_lora 16;
    dense layer 0 of width 40; MoE layers 1-2: top-3 of 8 experts of width 24, shared width 2 x 24)."""
    from framework.models.deepseek_v3.config import load_deepseek_v3_config
    from framework.train.flops import flops_per_token

    config = load_deepseek_v3_config({**TINY_DEEPSEEK, "q_lora_rank": q_lora_rank})
    h, heads, qk, v, rope, nope, kv_rank, vocab, seq = 32, 4, 24, 8, 8, 16, 16, 96, 16
    query = h * heads * qk if q_lora_rank is None else h * q_lora_rank + q_lora_rank * heads * qk
    attention = query + h * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * h
    dense = 3 * h * 40
    moe = (3 * 24 + 2 * 24) * 3 * h + h * 8
    matmul = vocab * h + 3 * attention + dense + 2 * moe
    scores = 3 * 3 * seq * (heads * qk + heads * v)  # QK^T at the qk width, AV at the v width
    assert 6 * matmul + scores == expected
    assert flops_per_token(config, seq) == expected


def test_deepspeed_auto_sizes_take_mla_configs():
    from framework.config.deepspeed import auto_sizes
    from framework.models.deepseek_v3.config import load_deepseek_v3_config

    sizes = auto_sizes(load_deepseek_v3_config(TINY_DEEPSEEK), ep_size=2)
    assert sizes["persistence"] == 8 * 32 + 1  # just above the router: it stays resident
    assert sizes["bucket"] == int(1e7)


def _flash_like_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                       **_):
    """Stands in for torch's flash varlen kernel on CPU, with its restriction: one head width for q, k and v."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash varlen takes one head width"
    assert window_size == (-1, 0)  # causal
    out = torch.empty_like(q)
    for lo, hi in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        doc = [t[lo:hi].transpose(0, 1) for t in (q, k, v)]
        out[lo:hi] = F.scaled_dot_product_attention(*doc, is_causal=True, scale=scale).transpose(0, 1)
    return out


def test_varlen_pads_mla_values(checkpoint, monkeypatch):
    """The varlen implementation zero-pads MLA's narrower value heads to the query width and slices the output back:
    the same logits and gradients as stock run per document (the kernel replaced by a CPU stand-in with flash's
    one-head-width rule; tests/gpu/test_deepseek_v3_varlen.py runs the real one)."""
    import torch.nn.attention.varlen as varlen

    from framework.models.attention import register_varlen_attention

    stock, hub = checkpoint
    stock.config._attn_implementation = "sdpa"
    stock.zero_grad()
    monkeypatch.setattr(varlen, "varlen_attn", _flash_like_varlen)
    ours = framework.load_model(hub, backend="eager", attn_implementation="sdpa")
    register_varlen_attention()
    ours.config._attn_implementation = "varlen"  # load_model refuses varlen without CUDA
    ids = batch(bsz=1, seq=12, pad_right=False)[0]
    lengths = [5, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out = ours(ids, position_ids=pos, labels=ids)
    ref_logits = torch.cat([stock(input_ids=d).logits for d in ids.split(lengths, dim=1)], dim=1)
    assert rel_err(out.logits, ref_logits) <= TOL
    F.cross_entropy(ref_logits[0, :-1], ids[0, 1:]).backward()
    out.loss.backward()
    _assert_same_grads(ours, stock)


def test_bias_update_rule_by_hand():
    """bias_e += rate * sign(mean_load - load_e), per layer, on the load summed over the step's micro-batches."""
    from framework.moe.aux_loss import RouterStats
    from framework.moe.bias_balancing import RouterBiasBalancer

    model = framework.load_model({**TINY_DEEPSEEK, "model_type": "deepseek_v3"}, backend="eager",
                                 router_bias_update_rate=0.01)
    balancer = RouterBiasBalancer(model, model.options.router_bias_update_rate)
    assert len(balancer.biases) == 2  # layers 1 and 2; layer 0 is dense
    zero = torch.zeros(())

    def stats(*loads):
        return [RouterStats(torch.tensor(load, dtype=torch.float32), zero, zero, zero) for load in loads]

    # micro-batch 1 and 2 of one step; layer 1's load sums to [5, 1, 3, 3, 3, 3, 3, 3] (mean 3),
    # layer 2's to [0, 0, 0, 0, 0, 0, 0, 24] (mean 3)
    balancer.accumulate(stats([4, 0, 1, 2, 1, 2, 1, 1], [0, 0, 0, 0, 0, 0, 0, 12]))
    balancer.accumulate(stats([1, 1, 2, 1, 2, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0, 12]))
    balancer.step()
    layer1, layer2 = (model.model.layers[i].mlp.gate.e_score_correction_bias for i in (1, 2))
    assert torch.equal(layer1, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(layer2, torch.tensor([0.01] * 7 + [-0.01]))
    balancer.step()  # nothing counted since: no change
    assert torch.equal(layer1, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))


def test_bias_update_counts_the_models_routing():
    """From a real forward pass: the update is computed from its router statistics (padding excluded) and moves
    the bias of the most loaded expert down."""
    from framework.moe.bias_balancing import RouterBiasBalancer

    model = framework.load_model({**TINY_DEEPSEEK, "model_type": "deepseek_v3"}, backend="eager",
                                 router_bias_update_rate=0.001)
    balancer = RouterBiasBalancer(model, 0.001)
    ids, mask, _ = batch()
    out = model(ids, attention_mask=mask)
    balancer.accumulate(out.router_stats)
    balancer.step()
    for stats, bias in zip(out.router_stats, balancer.biases):
        assert stats.tokens_per_expert.sum() == mask.sum() * 3
        load = stats.tokens_per_expert
        assert torch.equal(bias, 0.001 * torch.sign(load.mean() - load))
        assert bias[load.argmax()] == -0.001


def test_bias_update_is_refused_without_a_bias():
    from tests.helpers import TINY

    with pytest.raises(ValueError, match="qwen3_moe routers have no selection bias"):
        framework.load_model(dict(TINY), router_bias_update_rate=0.001)


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    """DeepSeek-V3 checkpoints store num_nextn_predict_layers MTP layers after the decoder (model.layers.61.* for
    61 layers): stock transformers skips them on load, and so do we; a layer beyond them is still refused."""
    from safetensors.torch import load_file

    stock = stock_deepseek(num_nextn_predict_layers=1)
    write_hub_per_expert(stock, str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items()
           if k.startswith("model.layers.2.")}
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)  # the MTP module's own projection
    save_file({**tensors, **mtp}, path, metadata={"format": "pt"})
    reloaded, info = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ours = framework.load_model(str(tmp_path), backend="eager")
    ids = batch()[0]
    with torch.no_grad():
        assert rel_err(ours(ids).logits, stock(ids).logits) <= TOL
    stock.config.num_nextn_predict_layers = 0
    stock.config.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="checkpoint tensor\\(s\\) the model does not have: model.layers.3."):
        framework.load_model(str(tmp_path), backend="eager")


def test_router_matches_stock_under_bf16():
    """Stock loads bf16 models with the router weight and bias in fp32 (_keep_in_fp32_modules_strict); ours keeps
    the weight in the model's dtype and computes its logits in fp32. From a bf16 checkpoint (weight values bf16) both
    route bf16 activations identically: same experts, same weights (ours cast to bf16 for the combine)."""
    stock = stock_deepseek()
    ours = framework.load_model(stock.config, backend="eager")
    ours.load_state_dict(stock.state_dict())
    ours.to(torch.bfloat16)
    ref_gate, our_gate = stock.model.layers[1].mlp.gate, ours.model.layers[1].mlp.gate
    with torch.no_grad():
        ref_gate.weight.copy_(our_gate.weight.float())  # the bf16 checkpoint's values, held in fp32 as stock does
    assert our_gate.weight.dtype == torch.bfloat16 and our_gate.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(256, stock.config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        ref_logits, ref_weights, ref_ids = ref_gate(x)
        routing = our_gate(x)
    assert torch.equal(routing.logits, ref_logits)
    assert torch.equal(routing.expert_ids, ref_ids)
    assert torch.equal(routing.weights, ref_weights.to(torch.bfloat16))


def test_aux_loss_is_the_balance_statistic_on_normalised_scores(checkpoint):
    """Not in stock's loss: E * sum_e(fraction of routed slots_e * mean normalised sigmoid score_e), pooled over
    layers, from stock's own router logits and choices (top_k when balanced); the loss is CE alone by default."""
    stock, hub = checkpoint
    ours = framework.load_model(hub, backend="eager", attn_implementation="eager")
    ids, _, labels = batch(pad_right=False)
    captured = []  # stock's (router logits, weights, expert ids) per MoE layer
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in
             stock.model.layers[1:]]
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref = stock(input_ids=ids, labels=labels)
    for h in hooks:
        h.remove()
    counts, prob_sum = torch.zeros(8), torch.zeros(8)
    for logits, _, chosen in captured:
        scores = logits.sigmoid()
        prob_sum += (scores / scores.sum(-1, keepdim=True)).sum(0)
        counts += torch.bincount(chosen.reshape(-1), minlength=8).float()
    tokens = len(captured) * ids.numel()
    expected = 8 * torch.sum((counts / tokens) * (prob_sum / tokens))
    assert rel_err(out.aux_loss, expected) <= TOL
    assert torch.equal(out.loss, out.lm_loss) and rel_err(out.loss, ref.loss) <= TOL


@pytest.mark.parametrize("mode", [True, "moe", "attention"])
def test_recompute_gives_the_same_gradients(checkpoint, mode):
    """Activation checkpointing recomputes MLA and the biased routing in backward: the same loss and gradients."""
    _, hub = checkpoint
    plain = framework.load_model(hub, backend="grouped_mm")
    again = framework.load_model(hub, backend="grouped_mm", activation_checkpointing=mode)
    ids, mask, labels = batch(pad_right=True)
    for model in (plain, again):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), again.parameters()):
        assert rel_err(q.grad, p.grad) <= TOL, name


def test_run_plan_takes_deepseek_v3_and_refuses_bias_updates_elsewhere(tmp_path):
    from framework.config import ConfigError, load_run_config
    from framework.config.plan import resolve_plan
    from tests.helpers import TINY_DEEPSEEK_RUN, write_mixtral_run_yaml, write_run_yaml

    common = ["data.synthetic=true", f"train.output_dir={tmp_path / 'run'}"]
    yaml_path = write_run_yaml(str(tmp_path / "deepseek.yaml"), TINY_DEEPSEEK_RUN, router_bias_update_rate=0.001)
    plan = resolve_plan(load_run_config(yaml_path, common), 2)
    assert plan.hf_config.model_type == "deepseek_v3" and plan.cfg.model.router_bias_update_rate == 0.001
    for path, overrides, message in [
        (yaml_path, ["parallel.ep_size=4", "model.hf_config.n_routed_experts=6", "model.hf_config.n_group=3"],
         "parallel.ep_size (4) must divide the model's n_routed_experts (6)"),
        (write_mixtral_run_yaml(str(tmp_path / "mixtral.yaml")), ["model.router_bias_update_rate=0.001"],
         "model.router_bias_update_rate=0.001: mixtral routers have no selection bias (e_score_correction_bias)"),
    ]:
        with pytest.raises(ConfigError) as info:
            resolve_plan(load_run_config(path, [*common, *overrides]), 4)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
