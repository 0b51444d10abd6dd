"""Qwen2-MoE and OLMoE (softmax top-k routers) on our MoE layer against stock transformers 5 (eager experts), fp32 on
CPU: hub per-expert checkpoints load with framework.load_model and give stock's logits, losses, aux loss and every
gradient; state dicts interchange strictly; collapsed routing (one expert takes every token, the others none)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import OlmoeConfig, OlmoeForCausalLM, PretrainedConfig, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func as olmoe_balance_loss
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func as qwen2_moe_balance_loss

import framework
from framework.models.registry import FAMILIES, family_for
from tests.helpers import assert_state_dicts_interchange, batch, rel_err, spread_weights, write_hub_per_expert

TOL = 1e-5
# H != I and H != 2I for every width (routed, shared, dense) so a gate/up or transpose mix-up cannot pass by shape;
# multiples of 8 for _grouped_mm strides. Qwen2-MoE: a dense middle layer (mlp_only_layers), q/k/v bias, top-k weights
# not renormalised (its default); OLMoE: renormalised, and clip_qkv small enough to clip (checked below).
TINY_QWEN2_MOE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                      shared_expert_intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                      mlp_only_layers=[1], qkv_bias=True, router_aux_loss_coef=0.02, output_router_logits=True,
                      max_position_embeddings=64, tie_word_embeddings=False)
TINY_OLMOE = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=1.0,
                  router_aux_loss_coef=0.02, output_router_logits=True, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Case:
    config_class: type
    stock_class: type
    tiny: dict
    balance_loss: object  # the family's transformers load_balancing_loss_func
    ours: str  # our causal-LM class name


CASES = {
    "qwen2_moe": Case(Qwen2MoeConfig, Qwen2MoeForCausalLM, TINY_QWEN2_MOE, qwen2_moe_balance_loss, "Qwen2MoeCausalLM"),
    "olmoe": Case(OlmoeConfig, OlmoeForCausalLM, TINY_OLMOE, olmoe_balance_loss, "OlmoeCausalLM"),
}


def stock_model(family: str, attn: str = "eager", seed: int = 0, **overrides):
    case = CASES[family]
    torch.manual_seed(seed)
    config = case.config_class(**{**case.tiny, **overrides})
    config._attn_implementation = attn
    config._experts_implementation = "eager"
    return spread_weights(case.stock_class(config).float())


@pytest.fixture(scope="module", params=list(CASES))
def checkpoints(request, tmp_path_factory):
    family = request.param
    stock = stock_model(family)
    hub = str(tmp_path_factory.mktemp(family) / "hub")
    write_hub_per_expert(stock, hub)
    return family, stock, hub


def forward_backward(model: torch.nn.Module, stock: bool, ids, mask, labels):
    """(outputs, {parameter name: gradient}) of the training loss (token CE + router_aux_loss_coef * aux loss)."""
    model.zero_grad(set_to_none=True)
    if stock:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    else:
        out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_gradients_match(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name, g_ref in ref.items():
        g = ours[name]
        if g_ref is None or not g_ref.any():  # an expert no token reached: no gradient in either
            assert g is None or not g.any(), name
        else:
            assert rel_err(g, g_ref) <= TOL, (name, rel_err(g, g_ref))


def test_hub_layout_is_what_transformers_reads(checkpoints):
    family, stock, hub = checkpoints
    reloaded, info = CASES[family].stock_class.from_pretrained(hub, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


@pytest.mark.parametrize("family,tied", [("qwen2_moe", False), ("olmoe", False), ("qwen2_moe", True)])
def test_state_dicts_interchange(family, tied):
    stock = stock_model(family, tie_word_embeddings=tied)
    ours = framework.load_model(stock.config, backend="eager", seed=3)
    assert type(ours).__name__ == CASES[family].ours
    ours_sd, stock_sd = ours.state_dict(), stock.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in stock_sd.items()}
    assert {k: tuple(v.shape) for k, v in ours.named_buffers()} == {k: tuple(v.shape)
                                                                     for k, v in stock.named_buffers()}
    assert_state_dicts_interchange(ours, CASES[family].stock_class, stock.config, stock_sd)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_shared_expert_is_a_dense_parameter():
    """Qwen2-MoE's shared expert and its gate sit beside `experts` in the block: ZeRO / EP see only `experts.*` as
    expert parameters (engine.py tag_expert_params, checkpoint/engine_state.py), so the shared ones are partitioned
    and reduced like any dense weight."""
    from framework.checkpoint.engine_state import _expert_param_ids

    model = framework.load_model(stock_model("qwen2_moe").config, backend="eager")
    expert_ids = _expert_param_ids(model)
    expert_names = {n for n, p in model.named_parameters() if id(p) in expert_ids}
    assert expert_names == {f"model.layers.{i}.mlp.experts.{w}" for i in (0, 2) for w in ("gate_up_proj", "down_proj")}
    shared = [n for n, _ in model.named_parameters() if ".shared_expert" in n]
    assert len(shared) == 2 * 4  # 2 MoE layers x (gate/up/down projections + sigmoid gate)


def test_zero12_blocks_are_deepspeed_moe_layers_and_keep_the_shared_expert():
    """Under ZeRO-1/2 with EP the placement builds every MoE block as a DeepSpeed MoE layer too (block_base,
    framework/zero/deepspeed_moe.py). The class must derive from the family's block first, or Qwen2-MoE's shared
    expert would silently drop out of the forward; the answers DeepSpeed reads come from the block."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from framework.moe.placement import ExpertPlacement
    from framework.zero.deepspeed_moe import deepspeed_moe_base

    config = stock_model("qwen2_moe").config
    plain = framework.load_model(config, backend="eager").eval()
    base = deepspeed_moe_base(SimpleNamespace(ep_size=1, group_name="ep_size_1"))
    model = framework.load_model(config, backend="eager", placement=ExpertPlacement(block_base=base)).eval()
    model.load_state_dict(plain.state_dict())
    ids = batch(bsz=2, seq=6, pad_right=False)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    for block, plain_block in zip(model.moe_blocks(), plain.moe_blocks()):
        assert isinstance(block, DeepSpeedMoE) and isinstance(block, type(plain_block))
        assert type(block).__name__ == type(plain_block).__name__ and hasattr(block, "shared_expert")
        assert (block.ep_size, block.expert_group_name) == (1, "ep_size_1")
        assert block.num_local_experts == block.num_experts == plain_block.num_experts


def test_initialize_refuses_blocks_built_for_another_zero_stage():
    from framework.moe.placement import ExpertPlacement
    from framework.zero.deepspeed_moe import deepspeed_moe_base
    from framework.zero.engine import check_deepspeed_moe_blocks

    config = stock_model("qwen2_moe").config
    groups = SimpleNamespace(ep_size=2, group_name="ep_size_2")
    for_zero3 = framework.load_model(config, backend="eager")
    for_zero2 = framework.load_model(config, backend="eager",
                                     placement=ExpertPlacement(block_base=deepspeed_moe_base(groups)))
    check_deepspeed_moe_blocks(for_zero3, groups, 3)  # ZeRO-3 takes expert groups from parameter tags
    check_deepspeed_moe_blocks(for_zero2, groups, 2)
    with pytest.raises(RuntimeError, match=r"ZeRO stage 2 with ep_size 2: MoE block model\.layers\.0\.mlp is not built "
                                           r"as a DeepSpeed MoE layer .*expert_placement\(groups, zero_stage=2\)"):
        check_deepspeed_moe_blocks(for_zero3, groups, 2)
    with pytest.raises(RuntimeError, match=r"ZeRO stage 3 with ep_size 2: MoE block model\.layers\.0\.mlp is built as "
                                           r"a DeepSpeed MoE layer.*expert_placement\(groups, zero_stage=3\)"):
        check_deepspeed_moe_blocks(for_zero2, groups, 3)
    other_group = SimpleNamespace(ep_size=4, group_name="ep_size_4")
    with pytest.raises(RuntimeError, match="is not built as a DeepSpeed MoE layer of this EP group"):
        check_deepspeed_moe_blocks(for_zero2, other_group, 2)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loaded_model_matches_transformers_padded(checkpoints, backend, attn):
    family, stock, hub = checkpoints
    stock.config._attn_implementation = attn
    ours = framework.load_model(hub, backend=backend, attn_implementation=attn).eval()
    assert type(ours).__name__ == CASES[family].ours
    for k, v in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ids, mask, labels = batch(pad_right=True)
    ref, ref_grads = forward_backward(stock, True, ids, mask, labels)
    out, grads = forward_backward(ours, False, ids, mask, labels)
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.aux_loss, ref.aux_loss) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert out.aux_loss.item() > 1.0  # balanced routing gives top_k = 2; a zero aux loss would pass trivially
    assert_gradients_match(grads, ref_grads)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_loaded_model_matches_transformers_packed(checkpoints, backend):
    """Packed documents (position ids restarting at 0) against stock transformers run on each document alone (stock
    does not separate packed documents itself); the reference loss, aux loss and gradients come from those runs."""
    family, stock, hub = checkpoints
    stock.config._attn_implementation = "sdpa"
    ours = framework.load_model(hub, backend=backend, attn_implementation="sdpa").eval()
    ids = batch(bsz=1, seq=12, pad_right=False)[0]
    lengths = [5, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)

    stock.zero_grad(set_to_none=True)
    docs = [stock(input_ids=d, output_router_logits=True) for d in ids.split(lengths, dim=1)]
    ref_logits = torch.cat([d.logits for d in docs], dim=1)
    ref_loss = F.cross_entropy(ref_logits[0, :-1], ids[0, 1:])  # our labels shift across documents too
    per_layer = [torch.cat(layer) for layer in zip(*(d.router_logits for d in docs))]
    ref_aux = CASES[family].balance_loss(tuple(per_layer), stock.config.num_experts, stock.config.num_experts_per_tok)
    (ref_loss + stock.config.router_aux_loss_coef * ref_aux).backward()
    ref_grads = {n: p.grad for n, p in stock.named_parameters()}

    ours.zero_grad(set_to_none=True)
    out = ours(ids, position_ids=pos, labels=ids)
    out.loss.backward()
    assert rel_err(out.logits, ref_logits) <= TOL
    assert rel_err(out.lm_loss, ref_loss) <= TOL
    assert rel_err(out.aux_loss, ref_aux) <= TOL
    assert rel_err(out.loss, ref_loss + stock.config.router_aux_loss_coef * ref_aux) <= TOL
    assert_gradients_match({n: p.grad for n, p in ours.named_parameters()}, ref_grads)


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_collapsed_routing_matches_transformers(family, backend, tmp_path):
    """Zero router weights: every token's softmax is uniform and both implementations' torch.topk (same input) pick
    the same single expert for every token, so one expert takes all tokens and the other seven are empty (no rows
    for grouped_mm, no gradient)."""
    stock = stock_model(family, num_experts_per_tok=1)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.zero_()
    write_hub_per_expert(stock, str(tmp_path))
    ours = framework.load_model(str(tmp_path), backend=backend, attn_implementation="eager").eval()
    ids, mask, labels = batch(pad_right=True)
    ref, ref_grads = forward_backward(stock, True, ids, mask, labels)
    out, grads = forward_backward(ours, False, ids, mask, labels)
    for stats in out.router_stats:
        assert int((stats.tokens_per_expert > 0).sum()) == 1  # one expert has every token, the rest none
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.aux_loss, ref.aux_loss) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert_gradients_match(grads, ref_grads)
    empty = [n for n, g in ref_grads.items() if n.endswith("experts.down_proj")]
    assert empty and all(int((g.flatten(1).abs().sum(1) > 0).sum()) == 1 for n, g in ref_grads.items() if n in empty)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_tied_embeddings_match_transformers(backend, tmp_path):
    """Qwen2-MoE with tie_word_embeddings: the checkpoint holds the embedding only (as save_pretrained writes a tied
    model); one Parameter serves both, its gradient the sum of both uses, as in transformers."""
    stock = stock_model("qwen2_moe", tie_word_embeddings=True)
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    write_hub_per_expert(stock, str(tmp_path))
    ours = framework.load_model(str(tmp_path), backend=backend, attn_implementation="eager").eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask, labels = batch(pad_right=True)
    ref, ref_grads = forward_backward(stock, True, ids, mask, labels)
    out, grads = forward_backward(ours, False, ids, mask, labels)
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert_gradients_match(grads, ref_grads)


def test_olmoe_clip_qkv_clips():
    """clip_qkv 1.0 in TINY_OLMOE takes effect (transformers' OlmoeAttention clamps, and we run that module): a model
    without the clamp gives other logits, so the parity tests above cover it."""
    stock = stock_model("olmoe")
    ours = framework.load_model(stock.config, backend="eager", attn_implementation="eager").eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    unclipped = framework.load_model({**TINY_OLMOE, "model_type": "olmoe", "clip_qkv": None}, backend="eager",
                                     attn_implementation="eager").eval()
    unclipped.load_state_dict(stock.state_dict(), strict=True)
    ids = batch(pad_right=False)[0]
    with torch.no_grad():
        assert rel_err(unclipped(ids).logits, ours(ids).logits) > 1e-2


@pytest.mark.parametrize("family,overrides,message", [
    ("qwen2_moe", {"use_sliding_window": True},
     "use_sliding_window / sliding_attention layer_types are not implemented"),
    ("qwen2_moe", {"hidden_act": "gelu"}, "hidden_act is 'gelu'; Qwen2-MoE experts are SwiGLU"),
    ("qwen2_moe", {"shared_expert_intermediate_size": None},
     "missing required Qwen2-MoE field(s) shared_expert_intermediate_size"),
    ("qwen2_moe", {"intermediate_size": None}, "dense layers exist (mlp_only_layers / decoder_sparse_step) but "
                                               "intermediate_size is not set"),
    ("olmoe", {"head_dim": 16}, "head_dim is 16; OLMoE's attention needs hidden_size / num_attention_heads (8)"),
    ("olmoe", {"sliding_window": 16}, "sliding_window 16 is not implemented"),
    ("olmoe", {"num_experts": None}, "missing required OLMoE field(s) num_experts"),
])
def test_config_errors_are_one_line(family, overrides, message, tmp_path):
    raw = {**CASES[family].tiny, "model_type": family}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for k in (k for k, v in overrides.items() if v is None):
        raw.pop(k)
    with pytest.raises(ValueError) as err:
        framework.load_model(raw)
    assert message in str(err.value) and str(err.value).startswith("config dict: ")
    assert "\n" not in str(err.value)


def test_family_for_reads_both_families(checkpoints):
    family, stock, hub = checkpoints
    assert family_for(hub) is FAMILIES[family]
    assert family_for(stock.config) is FAMILIES[family]
    assert family_for({"model_type": family}) is FAMILIES[family]


def _flops_by_hand(config: PretrainedConfig, moe_layers: int, dense_layers: int, shared: int, seq: int) -> float:
    h, qd, kvd, vocab = config.hidden_size, 32, 16, config.vocab_size
    inter, e, k = (config.moe_intermediate_size if hasattr(config, "shared_expert_intermediate_size")
                   else config.intermediate_size), config.num_experts, config.num_experts_per_tok
    attention = h * qd + 2 * h * kvd + qd * h
    moe = attention + k * 3 * h * inter + h * e + shared
    dense = attention + 3 * h * config.intermediate_size
    return 6 * (moe_layers * moe + dense_layers * dense + h * vocab) + 6 * (moe_layers + dense_layers) * seq * qd


def test_flops_per_token_counts_the_shared_expert():
    from framework.train.flops import flops_per_token

    qwen2 = FAMILIES["qwen2_moe"].load_config({**TINY_QWEN2_MOE, "model_type": "qwen2_moe"})
    shared = 3 * 32 * 56 + 32  # the shared expert's SwiGLU and its [1, H] sigmoid gate, every token
    expected = _flops_by_hand(qwen2, moe_layers=2, dense_layers=1, shared=shared, seq=16)
    assert expected == 6 * (2 * (3072 + 4608 + 256 + 5408) + (3072 + 3840) + 3072) + 6 * 3 * 16 * 32
    assert flops_per_token(qwen2, 16) == expected
    olmoe = FAMILIES["olmoe"].load_config({**TINY_OLMOE, "model_type": "olmoe"})
    assert flops_per_token(olmoe, 16) == _flops_by_hand(olmoe, moe_layers=2, dense_layers=0, shared=0, seq=16)


@pytest.mark.parametrize("family", list(CASES))
def test_deepspeed_auto_sizes_read_the_family_fields(family):
    from framework.config.deepspeed import auto_sizes

    config = FAMILIES[family].load_config({**CASES[family].tiny, "model_type": family})
    sizes = auto_sizes(config, ep_size=2)
    assert sizes["bucket"] == int(1e7)  # tiny: the floor
    assert sizes["persistence"] == min(8 * 32 + 1, 32 * 2 * 8)  # router E x H + 1 vs the k/v projection H x 16


@pytest.mark.parametrize("family", list(CASES))
def test_resolve_plan_takes_the_family_and_checks_its_expert_fields(family, tmp_path):
    from framework.config.load import load_run_config
    from framework.config.plan import ConfigError, resolve_plan
    from tests.helpers import write_family_run_yaml

    yaml_path = write_family_run_yaml(str(tmp_path / f"{family}.yaml"), family)
    common = ["data.synthetic=true", f"train.output_dir={tmp_path / 'run'}"]
    plan = resolve_plan(load_run_config(yaml_path, common), 2)
    assert plan.hf_config.model_type == family and plan.hf_config.num_experts == 8
    plan = resolve_plan(load_run_config(yaml_path, [*common, "model.num_layers=2"]), 1)
    assert plan.hf_config.num_hidden_layers == 2
    assert framework.load_model(plan.model_source, backend="eager").config.num_hidden_layers == 2
    with pytest.raises(ConfigError) as info:
        resolve_plan(load_run_config(yaml_path, [*common, "parallel.ep_size=4", "model.hf_config.num_experts=6"]), 4)
    assert "parallel.ep_size (4) must divide the model's num_experts (6)" in str(info.value)


def test_olmoe_takes_either_spelling_of_the_expert_count():
    raw = {**TINY_OLMOE, "model_type": "olmoe"}
    raw["num_local_experts"] = raw.pop("num_experts")
    model = framework.load_model(raw, backend="eager")
    assert model.config.num_experts == 8 and all(b.num_experts == 8 for b in model.moe_blocks())


def _per_document_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=True, enable_gqa=False):
    """CPU stand-in for torch's flash varlen kernel: fp32 causal sdpa document by document ([T, heads, D])."""
    outs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=is_causal, scale=scale,
                                                   enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("family", list(CASES))
def test_family_attention_passes_document_boundaries_to_varlen(family, monkeypatch):
    """The "varlen" implementation gets each packed document's boundaries (cu_seqlens) through transformers'
    attention module's **kwargs: with a per-document stand-in kernel, packed rows give the block-diagonal-mask
    logits. An attention module that dropped the keyword would attend across documents (GPU kernels:
    tests/gpu/test_varlen_attention.py)."""
    import sys
    import types

    import framework.models.attention as attention

    kernel = types.ModuleType("torch.nn.attention.varlen")
    kernel.varlen_attn = _per_document_varlen_attn
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", kernel)
    monkeypatch.setattr(attention, "varlen_attention_available", lambda: True)
    monkeypatch.setattr(attention, "varlen_parameters", lambda: frozenset({"is_causal", "enable_gqa"}))
    config = {**CASES[family].tiny, "model_type": family}
    masked = framework.load_model(config, backend="eager", attn_implementation="sdpa", seed=5).eval()
    varlen = framework.load_model(config, backend="eager", attn_implementation="varlen", seed=5).eval()
    ids = batch(bsz=2, seq=12, pad_right=False)[0]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([5, 3, 4], [7, 5])])
    with torch.no_grad():
        want, got = masked(ids, position_ids=pos).logits, varlen(ids, position_ids=pos).logits
        whole_rows = masked(ids).logits  # what attending across documents would give
    assert rel_err(got, want) <= TOL
    assert rel_err(whole_rows, want) > 1e-3


@pytest.mark.parametrize("family", list(CASES))
def test_recompute_and_chunked_loss_keep_the_gradients(family):
    """Activation checkpointing (whole layers, the MoE half with Qwen2-MoE's shared expert inside, the attention half)
    and the chunked LM-head loss give the plain model's loss and gradients."""
    config = {**CASES[family].tiny, "model_type": family}
    ids, mask, labels = batch(pad_right=True)
    plain = framework.load_model(config, backend="eager", seed=7)
    want, want_grads = forward_backward(plain, False, ids, mask, labels)
    for options in ({"activation_checkpointing": True}, {"activation_checkpointing": "moe"},
                    {"activation_checkpointing": "attention", "loss_chunk_tokens": 8}):
        model = framework.load_model(config, backend="eager", seed=7, **options)
        got, grads = forward_backward(model, False, ids, mask, labels)
        assert rel_err(got.loss, want.loss) <= TOL, options
        assert_gradients_match(grads, want_grads)
