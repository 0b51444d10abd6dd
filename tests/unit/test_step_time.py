"""framework/tuning/step_time.py and `tools/tune_zero.py time`: the traffic formulas by hand and against a sampled
routing, the choice of link per group, and the command's table and one-line errors."""

from __future__ import annotations

import os
import re

import pytest
import torch

from framework.checkpoint.cli import run_cli
from framework.tuning.params import ParamSpec
from framework.tuning.step_time import Plan, Rates, all_to_all_bytes, distinct_ranks, step_time, zero_bytes
from tests.helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_30B = os.path.join(REPO, "model_configs", "qwen3-30b-a3b.yaml")
PARAMS = [ParamSpec("embed", 100, False), ParamSpec("experts", 80, True, 0)]  # 100 dense, 80 expert elements


@pytest.mark.parametrize("experts,top_k,ep", [(128, 8, 8), (128, 8, 4), (64, 8, 2), (8, 2, 4)])
def test_distinct_ranks_matches_sampled_routing(experts, top_k, ep):
    """A token's K distinct experts drawn uniformly, the experts split over EP ranks in blocks of E/EP."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.rand(200_000, experts, generator=gen).topk(top_k, dim=-1).indices
    ranks = torch.zeros(ids.shape[0], ep, dtype=torch.bool).scatter_(1, ids // (experts // ep), True)
    sampled = ranks.sum(1).double().mean().item()
    assert abs(distinct_ranks(experts, top_k, ep) - sampled) < 0.01 * sampled


def test_all_to_all_bytes_by_hand():
    # E=4, K=2, EP=2: a token misses the other rank only when both experts are local, 1 of C(4,2)=6 pairs -> 5/3
    # ranks per token, half of them remote; 6 tokens, 2 layers, H=4, bf16, dispatch + combine
    plan = Plan(1, 2, 2, 3, micro_batch_size=1, seq_len=6, checkpointing=True)
    assert distinct_ranks(4, 2, 2) == pytest.approx(5 / 3)
    assert all_to_all_bytes(plan, 4, 2, 4, 2) == 2 * 3 * 2 * (6 * 5 / 3 / 2) * 4 * 2  # 3 passes with recompute
    no_recompute = Plan(1, 2, 2, 3, micro_batch_size=1, seq_len=6, checkpointing=False)
    assert all_to_all_bytes(no_recompute, 4, 2, 4, 2) == 2 * 2 * 2 * 5 * 4 * 2
    attention_only = Plan(1, 2, 2, 3, micro_batch_size=1, seq_len=6, checkpointing="attention")
    assert all_to_all_bytes(attention_only, 4, 2, 4, 2) == all_to_all_bytes(no_recompute, 4, 2, 4, 2)
    assert all_to_all_bytes(Plan(1, 2, 1, 3, 1, 6), 4, 2, 4, 2) == 0  # no expert parallelism, nothing sent


def test_zero_bytes_by_hand():
    # 4 ranks, EP 2 -> a rank holds 40 expert elements, shared with 1 other rank (EDP 2); ring: (n-1)/n of 2 bytes each
    dense, expert = 2 * 100 * 3 / 4, 2 * 40 * 1 / 2
    assert zero_bytes(Plan(2, 2, 2, 2, 1, 8), PARAMS) == (dense, expert, dense, expert)  # reduce / step's gather
    assert zero_bytes(Plan(2, 2, 2, 3, 1, 8, checkpointing=False), PARAMS) == (3 * dense, 3 * expert, 0, 0)
    for checkpointing in (True, "moe", "attention"):  # any recompute gathers the layer a third time
        assert zero_bytes(Plan(2, 2, 2, 3, 1, 8, checkpointing=checkpointing), PARAMS) == (4 * dense, 4 * expert, 0, 0)
    with pytest.raises(ValueError, match="ZeRO-2 and ZeRO-3"):
        zero_bytes(Plan(2, 2, 2, 1, 1, 8), PARAMS)


def test_step_time_links_and_accumulation():
    rates = Rates(compute_tflops=1e-9, intra_gbs=1.0, inter_gbs=0.5)  # 1 kFLOP/s: compute in readable seconds
    one_node = Plan(1, 4, 2, 2, 1, 8, micro_steps=3, checkpointing=False)
    t = step_time(one_node, rates, 10.0, 4, 2, 4, 2, PARAMS)
    assert t.compute == pytest.approx(3 * 10.0 * 8 / 1e3)
    a2a = 3 * all_to_all_bytes(one_node, 4, 2, 4, 2)
    assert t.all_to_all_bytes == int(a2a) and t.all_to_all == pytest.approx(a2a / 1e9)
    dense, expert = 2 * 100 * 3 / 4, 2 * 40 * 1 / 2  # W=4, EDP=2
    assert t.zero == pytest.approx((3 + 1) * (dense + expert) / 1e9)  # inside one node: all at intra_gbs
    two_nodes = Plan(2, 2, 2, 2, 1, 8, micro_steps=3, checkpointing=False)
    t2 = step_time(two_nodes, rates, 10.0, 4, 2, 4, 2, PARAMS)
    assert t2.zero == pytest.approx(4 * (dense + expert) / 0.5e9)  # both groups span the nodes
    assert t2.all_to_all == pytest.approx(a2a / 1e9)  # EP stays inside a node
    hidden = step_time(two_nodes, Rates(1e-9, 1.0, 0.5, a2a_hidden=0.5, zero_hidden=0.25), 10.0, 4, 2, 4, 2, PARAMS)
    assert hidden.all_to_all == pytest.approx(0.5 * t2.all_to_all) and hidden.zero == pytest.approx(0.75 * t2.zero)
    with pytest.raises(ValueError, match="inside a node"):
        step_time(Plan(2, 2, 4, 2, 1, 8), rates, 10.0, 4, 2, 4, 2, PARAMS)


def test_time_command_compares_zero_stages(capsys):
    """Qwen3-30B-A3B, micro batch 1 with checkpointing, on 2 and 8 nodes of 8 GPUs: both stages fit, and ZeRO-3
    moves every parameter four times per micro step where ZeRO-2 reduces gradients once, so with no overlap modelled
    ZeRO-2 is the faster. Without checkpointing at micro batch 4 the 48 layers' activations fit neither."""
    tool = load_tool("tune_zero")
    assert tool.main(["time", "--config", CONFIG_30B, "--nodes", "2", "8", "--micro_batch_size", "1",
                      "--activation_checkpointing", "on"]) == 0
    out = capsys.readouterr().out
    assert "compute 138.5 TFLOP/s/GPU" in out and "ZeRO-2 EP8" in out and "ZeRO-3 EP8" in out
    verdicts = [line for line in out.splitlines() if "->" in line]
    assert len(verdicts) == 2 and all("ZeRO-2+EP is" in v and "as fast as ZeRO-3+EP" in v for v in verdicts), out
    # each plan's memory is `tune_zero estimate`'s for the same run (its DeepSpeed JSON, attention, loss chunks)
    assert tool.main(["estimate", "--config", CONFIG_30B, "--num_gpus", "16", "--ep_size", "8", "--zero_stage", "3",
                      "--micro_batch_size", "1", "--activation_checkpointing", "on"]) == 0
    peak = re.search(r"^peak (\d+\.\d) GiB per GPU", capsys.readouterr().out, re.M).group(1)
    assert re.search(rf"^ +2 +16  ZeRO-3 EP8 +{peak} GiB ", out, re.M), (peak, out)
    assert tool.main(["time", "--config", CONFIG_30B, "--nodes", "2", "--micro_batch_size", "4",
                      "--activation_checkpointing", "off"]) == 0
    out = capsys.readouterr().out
    assert "compute 344 TFLOP/s/GPU" in out and "(does not fit)" in out and "2 nodes: neither fits" in out


@pytest.mark.parametrize("args,message", [
    (["--ep_size", "3"], "--ep_size 3: must divide --gpus_per_node 8"),
    (["--micro_batch_size", "2"], "--compute_tflops: no measured one-GPU rate for micro batch 2"),
    (["--a2a_hidden", "1.5"], "--a2a_hidden 1.5: a share"),
    (["--nodes", "0"], "--nodes [0]: every node count must be >= 1"),
])
def test_time_errors_are_one_line(args, message, capsys):
    code = run_cli(load_tool("tune_zero").main, "tune_zero", ["time", "--config", CONFIG_30B, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
