"""tools/moe_merge.py and tools/moe_split.py for every registered family (tests/family_cases.py TINY_STOCK_CONFIGS):
a tiny stock model saved by stock transformers 5 in its hub per-expert layout (Mixtral: block_sparse_moe.experts.{e}.
w1/w3/w2) -> merge -> split gives back every tensor bit for bit; the merged directory loads in framework.load_model
with stock logits, and both outputs load in stock `from_pretrained` strictly with stock logits. Tied embeddings stay
tied (the mixtral case)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import framework
from framework.checkpoint.cli import run_cli
from framework.checkpoint.expert_geometry import read_expert_geometry
from framework.checkpoint.hf_layout import detect_layout, per_expert_key
from framework.models.registry import FAMILIES
from tests.family_cases import TINY_STOCK_CONFIGS
from tests.helpers import read_safetensors_dir, rel_err, spread_weights
from tests.unit.test_checkpoint_tools import assert_same_tensors, merge_tool, split_tool

TOL = 1e-5


def stock_model(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **TINY_STOCK_CONFIGS[model_type])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return spread_weights(AutoModelForCausalLM.from_config(config).float())


def stock_load(path: str) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """model_type -> the stock model, its hub directory (several shards), merged and split through the CLIs."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    stock = stock_model(model_type)  # KeyError: a registered family without its entry in TINY_STOCK_CONFIGS
    hub, merged, split = (str(root / n) for n in ("hub", "merged", "split"))
    stock.save_pretrained(hub, max_shard_size="20KB")  # stock transformers 5 writes the hub layout
    assert run_cli(merge_tool.main, "moe_merge", ["--raw_hf_path", hub, "--merge_hf_path", merged,
                                                  "--max_shard_size", "20KB", "--verify", "--quiet"]) == 0
    assert run_cli(split_tool.main, "moe_split", ["--merge_hf_path", merged, "--output_hf_path", split,
                                                  "--max_shard_size", "20KB", "--verify", "--quiet"]) == 0
    ids = torch.randint(0, stock.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    return {"model_type": model_type, "stock": stock, "hub": hub, "merged": merged, "split": split, "ids": ids}


def test_hub_input_is_per_expert_and_merged_is_fused(converted):
    hub, merged = read_safetensors_dir(converted["hub"]), read_safetensors_dir(converted["merged"])
    assert len([n for n in os.listdir(converted["hub"]) if n.endswith(".safetensors")]) > 1
    # the hub's names as stored; only the family's key map makes them per_expert
    key_map = FAMILIES[converted["model_type"]].checkpoint_key or (lambda key: key)
    assert detect_layout([key_map(k) for k in hub]) == "per_expert"
    assert detect_layout(list(merged)) == "fused"
    assert set(hub) != set(merged)


def test_merge_then_split_is_bit_exact(converted):
    assert_same_tensors(read_safetensors_dir(converted["hub"]), read_safetensors_dir(converted["split"]))


def test_merged_loads_in_the_framework_with_stock_logits(converted):
    ours = framework.load_model(converted["merged"], backend="eager", dtype=torch.float32,
                                attn_implementation="eager").eval()
    ids = converted["ids"]
    assert rel_err(logits(ours, ids), logits(converted["stock"], ids)) <= TOL


@pytest.mark.parametrize("which", ["merged", "split"])
def test_outputs_load_strictly_in_stock_transformers(converted, which):
    model = stock_load(converted[which])
    ids = converted["ids"]
    assert torch.equal(logits(model, ids), logits(converted["stock"], ids))
    if converted["stock"].config.tie_word_embeddings:
        assert "lm_head.weight" not in read_safetensors_dir(converted[which])  # tied: stays implicit
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_misshaped_hub_expert_is_named_as_stored(converted, tmp_path, capsys):
    """One-line errors name the tensor as the family's hub file holds it (Mixtral: block_sparse_moe.experts.3.w2)."""
    geometry = read_expert_geometry(converted["hub"])
    layer = geometry.moe_layers[0]
    stored = geometry.written_name("per_expert")(per_expert_key(f"model.layers.{layer}.mlp.experts", 3, "down_proj"))
    tensors = read_safetensors_dir(converted["hub"])
    tensors[stored] = tensors[stored].T.contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    shutil.copy(os.path.join(converted["hub"], "config.json"), bad / "config.json")
    assert run_cli(merge_tool.main, "moe_merge", ["--raw_hf_path", str(bad), "--merge_hf_path",
                                                  str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    h, i = geometry.hidden_size, geometry.expert_width
    assert err.count("\n") == 1 and f"{stored}: expected shape [{h}, {i}], found [{i}, {h}]" in err, err


def test_the_table_covers_a_tied_family_and_a_dense_layer():
    """What the cases above must keep covering whatever families are added."""
    assert any(c.get("tie_word_embeddings") for c in TINY_STOCK_CONFIGS.values())
    assert any(c.get("mlp_only_layers") for c in TINY_STOCK_CONFIGS.values())
