"""tools/tune_zero.py estimate and framework/tuning: hand-computed ZeRO-3 / ZeRO-2 / offload figures for
Qwen3-30B-A3B, the activation formulas against the tensors autograd really saves, measured H100/H200 peaks within 15%,
and one-line CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from framework.checkpoint.cli import run_cli
from framework.tuning.activations import attention_saved, layer_saved, mlp_saved
from framework.tuning.estimate import _sub_groups, estimate_memory
from framework.models.registry import FAMILIES
from framework.tuning.params import model_shape, param_inventory
from tests.family_cases import MODEL_CONFIGS, REAL_SHAPE_CONFIGS
from tests.helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_30B = os.path.join(REPO, "model_configs", "qwen3-30b-a3b.yaml")
with open(CONFIG_30B) as _f:
    HF_30B = yaml.safe_load(_f)["model"]["hf_config"]

# The ZeRO settings of the measured runs (the framework's defaults then) and of the hand computations below.
ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
         "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e6,
         "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}
ZERO2 = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
         "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}


def ds(zero: dict, offload: bool = False, torch_adam: bool = True) -> dict:
    zero = dict(zero, **({"offload_optimizer": {"device": "cpu", "pin_memory": True}} if offload else {}))
    return {"zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"torch_adam": torch_adam}}}


# ---- Qwen3-30B-A3B by hand: H 2048, V 151936, 48 layers, 32 q / 4 kv heads x 128, 128 experts top-8, I 768 -------
H, V, L, E, K, I, HD = 2048, 151936, 48, 128, 8, 768, 128
EXPERTS = 48 * 128 * 3 * 2048 * 768  # gate_up [E, 2I, H] + down [E, H, I] per layer = 28,991,029,248
ATTENTION = 2048 * 4096 + 2048 * 512 + 2048 * 512 + 4096 * 2048 + 128 + 128  # q, k, v, o, q_norm, k_norm
ROUTER, LAYER_NORMS = 128 * 2048, 2 * 2048
DENSE = 2 * 151936 * 2048 + 2048 + 48 * (ATTENTION + ROUTER + LAYER_NORMS)  # embed + lm_head + final norm + layers
# 16 GPUs, EP=8 (16 experts a rank), EDP=2: dense over 16 ranks, the rank's experts over 2 -> 1/16 of each
DENSE_PART = DENSE // 16  # 96,318,336 (every dense tensor divides by 16)
EXPERT_PART = EXPERTS // 8 // 2  # 1,811,939,328
PART = DENSE_PART + EXPERT_PART  # 1,908,257,664 elements this rank's optimizer owns
PERSISTENT = 48 * (ROUTER + LAYER_NORMS + 128 + 128) + 2048  # <= 1e6 elements: routers and norms stay whole
LM_HEAD = 151936 * 2048  # the largest module ZeRO-3 gathers (a layer's 16 local experts: 75.5 M)
# ZeRO-3 sub-groups fill up to >= 1e9 elements: each layer's local expert partitions are 25,165,824 (gate_up) +
# 12,582,912 (down); after 26 layers (981,467,136) the 27th gate_up closes the first one.
LARGEST_SUB_GROUP = 26 * (25165824 + 12582912) + 25165824  # 1,006,632,960
TOKENS = 4096
# Activations at the loss backward, checkpointing on, per token: 48 checkpointed layer inputs (bf16), rotary cos and
# sin, the final norm (bf16 input, fp32 rstd) and its output kept by lm_head, then bf16 logits + fp32
# log-probs + their fp32 gradient + the fp32 logits' gradient.
LOSS_ACTIVATIONS = TOKENS * (2 * H * L + 2 * 2 * HD + (2 * H + 4) + 2 * H + (2 + 4 + 4 + 4) * V)


def test_parameter_counts_by_hand():
    assert EXPERTS == 28_991_029_248 and DENSE == 1_541_093_376 and PART == 1_908_257_664
    est = estimate_memory(HF_30B, 16, 8, 3, 1, 4096, True, False, ds(ZERO3), "varlen")
    assert est.num_params == DENSE + EXPERTS == 30_532_122_624 and est.num_expert_params == EXPERTS


def test_zero3_ep8_on_16_gpus_by_hand():
    est = estimate_memory(HF_30B, 16, 8, 3, 1, 4096, True, False, ds(ZERO3), "varlen")
    s = est.state
    assert s.parameters == 2 * (PART + PERSISTENT)  # bf16 partitions + whole routers / norms
    assert s.gradients == {"loss": 2 * PART, "layer_backward": 2 * PART, "optimizer_step": 2 * PART}  # bf16
    assert s.optimizer_states == (4 + 4 + 4) * PART  # fp32 master, Adam m, v
    assert s.largest_step_group == LARGEST_SUB_GROUP
    assert s.step_temporaries == 0  # AdamW steps in place from the bf16 gradient buffer
    bucket = 2 * 5e8  # the reduce bucket (bf16), allocated at start-up
    assert s.buffers["loss"] == bucket + 2 * (LM_HEAD + 5e8)  # the LM head + the 5e8 prefetch, gathered in bf16
    assert s.buffers["optimizer_step"] == bucket
    loss, layer, step = est.phases()
    assert loss.activations == LOSS_ACTIVATIONS
    assert loss.total == 16 * PART + 2 * PERSISTENT + LOSS_ACTIVATIONS + bucket + 2 * (LM_HEAD + 5e8)
    logits = 2 * TOKENS * V  # the trainer still holds the bf16 logits during engine.step()
    assert step.total == 16 * PART + 2 * PERSISTENT + bucket + logits
    # ZeRO-3 keeps 16 bytes per parameter of the model, spread over 16 GPUs: about one byte per parameter each
    assert est.peak().name == "loss" and est.total_bytes == loss.total
    assert est.total_gib == pytest.approx(39.80, abs=0.01) and est.fits(80)


def test_zero2_ep8_on_16_gpus_by_hand():
    est = estimate_memory(HF_30B, 16, 8, 2, 1, 4096, True, False, ds(ZERO2), "varlen")
    s = est.state
    local = DENSE + EXPERTS // 8  # bf16 weights whole: all dense tensors + the rank's 16 experts per layer
    assert s.parameters == 2 * local
    assert s.optimizer_states == 12 * (DENSE_PART + EXPERT_PART)  # dense over 16, experts over EDP=2
    assert s.gradients == {"loss": 0, "layer_backward": 2 * PART, "optimizer_step": 2 * PART}  # bf16 partition
    assert s.buffers["layer_backward"] == 2 * 2 * 5e8 + 2 * LM_HEAD  # two reduce buckets + one full gradient
    # optimizer groups: the dense partition (96.3 M) and expert chunks of <= 178,956,971 local elements (two layers:
    # 150,994,944) over EDP=2 (75.5 M): the dense group is the largest stepped at once
    assert s.largest_step_group == DENSE_PART and s.step_temporaries == (2 + 4) * DENSE_PART  # flat bf16 + fp32
    loss, _, step = est.phases()
    assert loss.total == 2 * local + 12 * PART + LOSS_ACTIVATIONS
    assert step.total == 2 * local + 2 * PART + 12 * PART + 2 * TOKENS * V + 6 * DENSE_PART
    assert est.total_bytes == max(p.total for p in est.phases())
    # with gradient accumulation the partition outlives the step's first backward, into the next loss backward
    accumulating = estimate_memory(HF_30B, 16, 8, 2, 1, 4096, True, False,
                                   dict(ds(ZERO2), gradient_accumulation_steps=4), "varlen")
    assert accumulating.state.gradients["loss"] == 2 * PART


def test_offload_by_hand():
    z3 = estimate_memory(HF_30B, 16, 8, 3, 1, 4096, True, True, ds(ZERO3, offload=True, torch_adam=False), "varlen")
    assert z3.state.optimizer_states == 0 and z3.state.gradients["loss"] == 0 and z3.state.step_temporaries == 0
    assert z3.state.parameters == 2 * (PART + PERSISTENT)
    # host: fp32 master + Adam m, v + fp32 gradients (4 x 4 bytes) + the bf16 gradient partitions; CPU Adam in place
    assert z3.cpu_bytes_per_rank == (4 * 4 + 2) * PART
    loss = z3.phases()[0]
    assert loss.total == 2 * (PART + PERSISTENT) + LOSS_ACTIVATIONS + 2 * 5e8 + 2 * (LM_HEAD + 5e8)
    torch_cpu = estimate_memory(HF_30B, 16, 8, 3, 1, 4096, True, True, ds(ZERO3, offload=True), "varlen")
    assert torch_cpu.cpu_bytes_per_rank == (4 * 4 + 2) * PART + 2 * 4 * LARGEST_SUB_GROUP  # sqrt(v), its quotient
    z2 = estimate_memory(HF_30B, 16, 8, 2, 1, 4096, True, True, ds(ZERO2, offload=True, torch_adam=False), "varlen")
    assert z2.cpu_bytes_per_rank == 4 * 4 * PART and z2.state.gradients["optimizer_step"] == 0
    assert z2.state.buffers["loss"] == 2 * LM_HEAD  # DeepSpeed's GPU staging buffer for offloaded gradients


# ---- measured peaks: torch.cuda.max_memory_allocated, max over ranks, launch/pretrain.py, ZeRO-3, torch AdamW,
# seq 4096, micro batch 1, activation checkpointing, sdpa with the packed-document mask, 30B-A3B widths ------------
MEASURED = [  # (GPUs, layers, EP, GiB)
    (4, 8, 4, 31.1),  # 4x H100
    (2, 8, 2, 52.4),  # 2x H100
    (2, 8, 1, 53.1),  # 2x H100
    (1, 4, 1, 58.8),  # 1x H100
    (1, 8, 1, 96.0),  # 1x H200
]


@pytest.mark.parametrize("gpus, layers, ep, measured", MEASURED)
def test_measured_peaks_within_15_percent(gpus, layers, ep, measured):
    est = estimate_memory(dict(HF_30B, num_hidden_layers=layers), gpus, ep, 3, 1, 4096, True, False, ds(ZERO3), "sdpa")
    assert abs(est.total_gib / measured - 1) <= 0.15, f"estimated {est.total_gib:.1f} GiB, measured {measured}"


# ---- the pieces -----------------------------------------------------------------------------------------------------
def _tiny_config(attn: str):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=48, moe_intermediate_size=32,
                         num_hidden_layers=2, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                         tie_word_embeddings=False)
    cfg._attn_implementation = attn
    return cfg


@pytest.mark.parametrize("config", [dict(HF_30B, num_hidden_layers=2), "tiny"])
def test_inventory_is_the_model_in_order_with_experts_marked(config):
    """named_parameters() order (DeepSpeed fills its groups in it), expert tensors exactly the experts' gate_up / down,
    each with its layer. (The counts against stock transformers, per family: tests/unit/test_param_counts.py.)"""
    from framework.models.qwen3_moe.config import load_hf_config
    from framework.models.options import ModelOptions
    from framework.models.qwen3_moe.model import Qwen3MoeCausalLM

    hf = _tiny_config("sdpa") if config == "tiny" else load_hf_config(config)
    with torch.device("meta"):
        model = Qwen3MoeCausalLM(hf, ModelOptions(backend="grouped_mm"))
    want = [(name, p.numel()) for name, p in model.named_parameters()]
    inventory = param_inventory(hf)
    assert [(p.name, p.numel) for p in inventory] == want
    assert {p.name for p in inventory if p.expert} == {
        f"model.layers.{i}.mlp.experts.{proj}" for i in range(hf.num_hidden_layers) if model_shape(hf).moe_layers[i]
        for proj in ("gate_up_proj", "down_proj")}
    assert all(p.layer == (int(p.name.split(".")[2]) if ".layers." in p.name else None) for p in inventory)


def _tiny_mixtral_config(attn: str):
    """_tiny_config's widths as a Mixtral (no q/k norms, every layer MoE)."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                        tie_word_embeddings=False)
    cfg._attn_implementation = attn
    return cfg


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("recompute", [None, "moe", "attention"])
def test_layer_activations_equal_what_autograd_saves(family, attn, recompute):
    """Every tensor a real bf16 layer saves for backward (unique storages; weights, the layer input, mask and rotary
    tables excluded) against layer_saved: an MoE layer and a dense-MLP layer (Qwen3-MoE), MoE layers without q/k
    norms (Mixtral). With one half recomputed, what the other half saves plus the checkpoint's input (for
    "attention": the layer input, excluded here)."""
    from framework.models.options import ModelOptions
    from framework.models.decoder import causal_mask
    from framework.models.registry import FAMILIES

    torch.manual_seed(0)
    cfg = _tiny_config(attn) if family == "qwen3_moe" else _tiny_mixtral_config(attn)
    model = FAMILIES[family].causal_lm(cfg, ModelOptions(backend="grouped_mm")).to(torch.bfloat16)
    model.init_weights()
    batch, seq = 2, 64
    shape = model_shape(cfg)
    for i, layer in enumerate(model.model.layers):
        h = torch.randn(batch, seq, 64, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(seq).expand(batch, seq)
        rope = model.model.rotary_emb(h, pos)
        mask = causal_mask(None, batch, seq, h.dtype, h.device, pos)
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(h, rope, mask, None, recompute=recompute)
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip |= {t.untyped_storage().data_ptr() for t in (h, mask, *rope)}
        got = sum(n for ptr, n in saved.items() if ptr not in skip)
        want = {None: layer_saved(shape, i, attn, seq, 1),
                "moe": attention_saved(shape, attn, seq) + 2 * 64,  # + the bf16 [B,S,H] residual the MoE half takes
                "attention": mlp_saved(shape, i, 1)}[recompute] * batch * seq
        # The estimate counts CUDA's fused rms_norm (bf16 input + fp32 rstd per row); on CPU rms_norm is composite
        # and keeps two fp32 [rows, width] tensors and one fp32 per row, and not the input: the norms of a layer
        # (input, post-attention, and Qwen3-MoE's q, k), of which the recomputed half's are not kept.
        norm_rows = [(batch * seq, 64, "attention"), (batch * seq, 64, "moe")]
        if shape.qk_norm:
            norm_rows += [(batch * seq * cfg.num_attention_heads, cfg.head_dim, "attention"),
                          (batch * seq * cfg.num_key_value_heads, cfg.head_dim, "attention")]
        want += sum(rows * (2 * 4 * width + 4 - (2 * width + 4))
                    for rows, width, half in norm_rows if half != recompute)
        # + the grouped GEMM's int32 expert offsets, [E] per MoE layer rather than per token
        assert 0 <= got - want <= 4 * cfg.num_experts, (i, got, want)


@pytest.mark.gpu
def test_real_width_layer_and_loss_on_gpu():
    """On the GPU (memory-efficient sdpa, CUDA kernels), one Qwen3-30B-A3B layer at 4096 tokens and the LM head's loss
    against the formulas, and the layer with either half recomputed. Measured (H100 and H200, torch 2.11): layer
    838.9 MB vs 857.8 MB estimated, 841.0 MB without the layer input the test holds (+0.3%); loss backward
    8,713.7 MB vs 14 x T x V = 8,712.6 MB."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    from framework.models.qwen3_moe.config import load_hf_config
    from framework.models.decoder import DecoderLayer, causal_lm_loss, causal_mask
    from framework.models.options import ModelOptions
    from framework.models.qwen3_moe import QWEN3_MOE
    from framework.tuning.activations import loss_backward_peak

    dev, seq = torch.device("cuda"), 4096
    cfg = load_hf_config(dict(HF_30B, num_hidden_layers=1))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0, ModelOptions(backend="grouped_mm"), QWEN3_MOE).to(dev, torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    pos = torch.cat([torch.arange(1000), torch.arange(seq - 1000)])[None].to(dev)  # two packed documents
    h = torch.randn(1, seq, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rope = Qwen3MoeRotaryEmbedding(cfg).to(dev)(h, pos)
    mask = causal_mask(None, 1, seq, h.dtype, dev, pos)
    layer(h, rope, mask, None)[0].sum().backward()  # warm-up: cuBLAS / grouped-GEMM workspaces are allocated once
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    y, stats = layer(h, rope, mask, None)
    saved = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    # The estimates count the layer's input, which the input norm keeps (in a model nothing else holds it); here it is
    # `h`, allocated before `base`: subtract it.
    layer_input = 2 * H
    assert saved == pytest.approx((layer_saved(model_shape(cfg), 0, "sdpa", seq, 1) - layer_input) * seq, rel=0.05)
    # The router statistics carry autograd history back through the attention half: kept alive, they would hold
    # this forward's activations into the next measurement, which then frees them (a negative "saved").
    del y, stats
    # One half recomputed: the other half's activations, plus the checkpoint's input where it is a new tensor (the
    # residual before the MoE half; the attention half's input is the layer input, allocated before `base`). Measured
    # on an H100 (torch 2.11) with recompute="moe": 206,654,464 bytes against 206,651,392 estimated.
    for recompute, want in (("moe", attention_saved(model_shape(cfg), "sdpa", seq) - layer_input + 2 * H),
                            ("attention", mlp_saved(model_shape(cfg), 0, 1))):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y, stats = layer(h, rope, mask, None, recompute=recompute)
        saved = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        assert saved == pytest.approx(want * seq, rel=0.05), recompute
        del y, stats
    lm_head = torch.nn.Linear(H, V, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, seq, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (1, seq), device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    logits = lm_head(x)  # held, as the trainer holds CausalLMOutput.logits
    loss = causal_lm_loss(logits, labels)
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak == pytest.approx(loss_backward_peak(model_shape(cfg)) * seq, rel=0.02)


def test_sub_groups_follow_deepspeed():
    assert _sub_groups([6, 6, 6, 6], 10) == [12, 12]  # a sub-group closes once it reaches the size
    assert _sub_groups([3, 3], 10) == [6]
    assert _sub_groups([4, 4, 4], 8) == [8, 4]


def test_verdicts_and_api_errors():
    est = estimate_memory(dict(HF_30B, num_hidden_layers=8), 1, 1, 3, 1, 4096, True, False, ds(ZERO3), "sdpa")
    assert est.verdict(141).startswith("fits") and est.fits(141)
    assert est.verdict(100).startswith("tight") and not est.fits(100)
    assert est.verdict(80).startswith("does not fit") and not est.fits(80)
    with pytest.raises(ValueError, match="zero_optimization.stage=3 disagrees with zero_stage=2"):
        estimate_memory(HF_30B, 16, 8, 2, ds_config=ds(ZERO3))
    with pytest.raises(ValueError, match="offload_optimizer disagrees with offload=True"):
        estimate_memory(HF_30B, 16, 8, 3, offload=True, ds_config=ds(ZERO3))
    with pytest.raises(ValueError, match=r"parallel.ep_size \(3\) must divide the number of processes \(16\)"):
        estimate_memory(HF_30B, 16, 3)


# ---- the command line -----------------------------------------------------------------------------------------------
def test_cli_table(capsys):
    tool = load_tool("tune_zero")
    assert tool.main(["estimate", "--config", CONFIG_30B, "--num_gpus", "16", "--ep_size", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters (bf16)", "gradients (bf16 partitions)", "optimizer states (fp32 master + Adam m, v)",
                 "activations, checkpointing on  <- used", "activations, checkpointing off",
                 "communication / prefetch buffers", "optimizer step temporaries", "total (checkpointing on)",
                 "EP=8 x EDP=2, ZeRO-3", "of 80 GiB: fits"):
        assert text in out, text
    assert tool.main(["estimate", "--config", CONFIG_30B, "--num_gpus", "12", "--ep_size", "4", "--zero_stage", "2",
                      "--offload", "--activation_checkpointing", "off", "--gpu_memory_gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "activations, checkpointing off  <- used" in out and "ZeRO-2, optimizer offloaded to CPU" in out
    assert "GiB per node of 8 GPUs" in out and "of 141 GiB" in out
    assert "train.global_batch_size (64) does not divide over 12 GPUs" in out


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_cli_plans_every_family(model_type, capsys):
    """Each registered family's real-shape run configs (tests/family_cases.py) get a plan, under its own field
    names (Mixtral: num_local_experts), with the parameter count of its model."""
    from framework.config import load_run_config
    from framework.config.plan import resolve_model

    from framework.models.registry import moe_shape

    for name in REAL_SHAPE_CONFIGS[model_type]:
        path = os.path.join(MODEL_CONFIGS, name)
        config = resolve_model(load_run_config(path))[1]
        ep = next(d for d in (8, 4, 2, 1) if moe_shape(config)[1] % d == 0)  # Qwen1.5-MoE-A2.7B: 60 experts
        assert load_tool("tune_zero").main(["estimate", "--config", path, "--num_gpus", "8", "--ep_size", str(ep)]) == 0
        out = capsys.readouterr().out
        params = sum(p.numel for p in param_inventory(config))
        assert f"{params / 1e9:.2f} B parameters" in out and f"EP={ep} x EDP={8 // ep}, ZeRO-3" in out, out
        assert "peak " in out and "GiB per GPU" in out, out
    mixtral = os.path.join(MODEL_CONFIGS, "mixtral-8x7b.yaml")
    code = run_cli(load_tool("tune_zero").main, "tune_zero", ["estimate", "--config", mixtral, "--num_gpus", "3", "--ep_size", "3"])
    assert code == 2 and "must divide the model's num_local_experts (8)" in capsys.readouterr().err


def test_search_checks_and_estimates_trials_of_another_family(tmp_path, monkeypatch, capsys):
    """tune_zero search's skip decision for a Mixtral run config (the trials themselves are launches, stubbed here):
    the ep check under Mixtral's field names, and an estimate for the trial that would run."""
    import csv

    from framework.tuning import search, search_cli

    decided = {}

    def no_launches(config, out_dir, trials, launcher, base_overrides, steps, warmup, auto, fits):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "trials.csv"), "w", newline="") as f:
            csv.DictWriter(f, fieldnames=search.FIELDS).writeheader()
        decided.update({t.ep_size: fits(t) for t in trials})
        return None

    monkeypatch.setattr(search_cli, "run_search", no_launches)
    config = os.path.join(MODEL_CONFIGS, "mixtral-8x7b.yaml")
    assert load_tool("tune_zero").main(["search", "--config", config, "--num_gpus", "6", "--ep_sizes", "2,3", "--out",
                         str(tmp_path / "search"), "--gpu_memory_gb", "1000", "train.global_batch_size=48"]) == 1
    assert decided[3][0] is False and "must divide the model's num_local_experts (8)" in decided[3][2]
    fits, gib, _ = decided[2]
    assert fits and 100 < gib < 1000, gib  # Mixtral-8x7B's 46.7 B parameters under ZeRO-3 over 6 GPUs
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--num_gpus", "16", "--ep_size", "3"], "parallel.ep_size (3) must divide the number of processes (16)"),
    (["--num_gpus", "3", "--ep_size", "3"], "parallel.ep_size (3) must divide the model's num_experts (128)"),
    (["--num_gpus", "16", "--zero_stage", "5"], "--zero_stage 5: unknown ZeRO stage; expected 0, 1, 2 or 3"),
    (["--num_gpus", "16", "--zero_stage", "0", "--offload"], "--offload needs parallel.zero_stage 1, 2 or 3"),
    (["--num_gpus", "0"], "--num_gpus 0: must be >= 1"),
    (["--num_gpus", "16", "train.lrr=1"], "unknown key train.lrr"),
    (["--num_gpus", "16", "--activation_checkpointing", "maybe"], "argument --activation_checkpointing: invalid"),
    ([], "the following arguments are required: --num_gpus"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    code = run_cli(load_tool("tune_zero").main, "tune_zero", ["estimate", "--config", CONFIG_30B, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tune_zero: error: ") and message in err, err


def test_cli_as_a_program():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "tune_zero.py"), "estimate", "--config",
                           "missing.yaml", "--num_gpus", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "tune_zero: error: config file missing.yaml does not exist"


def test_loss_chunking_shrinks_the_loss_peak():
    """train.loss_chunk_tokens: one chunk's logits instead of the whole sequence's (plus the gradients the fused loss
    computes in its forward), and no logits held after."""
    from framework.config import load_run_config
    from framework.models.qwen3_moe.config import load_hf_config
    from framework.tuning.activations import activation_peaks, chunked_loss_peak, loss_backward_peak

    cfg = load_run_config(os.path.join(REPO, "model_configs", "qwen3-30b-a3b-8l.yaml"))
    shape = model_shape(load_hf_config(cfg.model.hf_config))
    whole = activation_peaks(shape, 1, 4096, True, "varlen", 4)
    chunked = activation_peaks(shape, 1, 4096, True, "varlen", 4, loss_chunk_tokens=1024)
    assert whole.loss - chunked.loss == 4096 * loss_backward_peak(shape) - chunked_loss_peak(shape, 1024, 4096)
    assert chunked_loss_peak(shape, 1024, 4096) == 1024 * 2 * 151936 + 4096 * 2 * 2048 + 4 * 151936 * 2048
    assert chunked.loss < whole.loss
    assert chunked.optimizer_step == 0 and whole.optimizer_step == 4096 * 2 * 151936


def test_z_loss_graph_is_counted_only_with_a_z_loss():
    """moe.z_loss_coef > 0: the router statistics keep logsumexp's graph (fp32 [T, E] per MoE layer) until the
    optimizer step where layers are not recomputed; with 0 (every shipped config) no statistic is computed. What a
    layer saves for backward with and without it: test_layer_activations_equal_what_autograd_saves."""
    from framework.config import load_run_config
    from framework.models.qwen3_moe.config import load_hf_config
    from framework.tuning.activations import activation_peaks

    cfg = load_run_config(os.path.join(REPO, "model_configs", "qwen3-30b-a3b-8l.yaml"))
    shape = model_shape(load_hf_config(cfg.model.hf_config))
    graph = 4096 * shape.num_moe_layers * (4 * shape.num_experts + 4)
    for mode, kept in ((False, graph), ("attention", graph), (True, 0), ("moe", 0)):
        without = activation_peaks(shape, 1, 4096, mode, "varlen", 4)
        with_z = activation_peaks(shape, 1, 4096, mode, "varlen", 4, z_loss=True)
        assert with_z.optimizer_step - without.optimizer_step == kept, mode
        # the layers that keep their MoE half also keep the z-loss's fp32 logits and logsumexp until their backward
        assert with_z.loss >= without.loss and with_z.layer_backward >= without.layer_backward, mode


def test_block_saves_the_z_loss_graph_only_with_a_z_loss():
    """What autograd keeps for an MoE block with and without the z-loss statistic differs by exactly the estimate's
    z terms of moe_saved: the fp32 logits [T, E] and logsumexp [T]."""
    from framework.moe.layer import MoEBlock
    from framework.moe.router import TopKRouter

    tokens, experts = 96, 8
    saved = {}
    for z_loss in (False, True):
        torch.manual_seed(0)
        block = MoEBlock(64, 32, experts, TopKRouter(64, experts, 2, True), torch.nn.SiLU(), "grouped_mm",
                         z_loss=z_loss).to(torch.bfloat16)
        x = torch.randn(1, tokens, 64, dtype=torch.bfloat16, requires_grad=True)
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, stats = block(x)
        assert (stats.z_sum is not None) == z_loss
        skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
        saved[z_loss] = sum(n for ptr, n in storages.items() if ptr not in skip)
    assert saved[True] - saved[False] == tokens * (4 * experts + 4)
