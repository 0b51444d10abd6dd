"""load_model: the three checkpoint layouts, config-only construction, one-line errors for bad input, and tied word
embeddings (load, random init, export)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import framework
from framework.moe.placement import ExpertPlacement
from framework.checkpoint.cli import run_cli
from framework.checkpoint.hf_export import write_hf_directory
from framework.parallel.groups import ParallelGroups
from framework.checkpoint.live_export import hf_config_dict, iter_full_parameters
from tests.helpers import TINY, batch, load_tool, read_safetensors_dir, rel_err, stock_model


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe", **config}, f)
    return path


def fused_to_stacked(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            inter = value.shape[1] // 2
            out[prefix + ".gate_proj"], out[prefix + ".up_proj"] = value[:, :inter], value[:, inter:]
        else:
            out[key] = value  # down_proj [E,H,I] has the same name and shape in both merged layouts
    return out


@pytest.fixture(scope="module")
def stock_and_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    stock = stock_model()
    per_expert = str(root / "per_expert")
    stock.save_pretrained(per_expert)
    keys = set(load_file(os.path.join(per_expert, "model.safetensors")))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys  # really the hub's per-expert layout
    sd = stock.state_dict()
    fused = write_checkpoint(str(root / "fused"), sd, TINY)
    stacked = write_checkpoint(str(root / "stacked"), fused_to_stacked(sd), TINY)
    return stock, {"per_expert": per_expert, "fused": fused, "stacked": stacked}, root


@pytest.mark.parametrize("layout", ["per_expert", "fused", "stacked"])
def test_each_layout_loads_to_identical_logits(stock_and_dirs, layout):
    stock, dirs, _ = stock_and_dirs
    model = framework.load_model(dirs[layout], backend="grouped_mm", attn_implementation="eager")
    ids, mask, _ = batch()
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    for name, tensor in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)


def test_config_only_is_random_init_and_seeded(stock_and_dirs):
    _, dirs, _ = stock_and_dirs
    a = framework.load_model(dict(TINY), backend="eager", seed=1)
    b = framework.load_model(os.path.join(dirs["fused"], "config.json"), backend="eager", seed=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    std = a.model.layers[0].mlp.experts.gate_up_proj.std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02


def test_bf16_load(stock_and_dirs):
    _, dirs, _ = stock_and_dirs
    model = framework.load_model(dirs["per_expert"], dtype=torch.bfloat16, backend="grouped_mm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_required_config_field(tmp_path):
    config = {k: v for k, v in TINY.items() if k != "moe_intermediate_size"}
    with pytest.raises(ValueError, match="missing required Qwen3-MoE field.*moe_intermediate_size"):
        framework.load_model(config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        framework.load_model(str(tmp_path))


def test_misshaped_expert_tensor_names_key_and_shapes(stock_and_dirs, tmp_path):
    stock, _, _ = stock_and_dirs
    sd = fused_to_stacked(stock.state_dict())
    sd["model.layers.2.mlp.experts.down_proj"] = sd["model.layers.2.mlp.experts.down_proj"].transpose(1, 2)
    path = write_checkpoint(str(tmp_path / "bad"), sd, TINY)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts.down_proj: expected shape \[8, 32, 24\], "
                                         r"found \[8, 24, 32\] \(transposed"):
        framework.load_model(path)


def test_missing_expert_is_named(stock_and_dirs, tmp_path):
    _, dirs, _ = stock_and_dirs
    sd = load_file(os.path.join(dirs["per_expert"], "model.safetensors"))
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    path = write_checkpoint(str(tmp_path / "missing"), sd, TINY)
    with pytest.raises(ValueError, match=r"missing expert 5 of layer 2 \(model.layers.2.mlp.experts.5.up_proj"):
        framework.load_model(path)


def test_config_disagreeing_with_tensors(stock_and_dirs, tmp_path):
    stock, _, _ = stock_and_dirs
    path = write_checkpoint(str(tmp_path / "wide"), stock.state_dict(), {**TINY, "hidden_size": 48})
    with pytest.raises(ValueError, match="model expects shape"):
        framework.load_model(path)
    path = write_checkpoint(str(tmp_path / "dense"), stock.state_dict(), {**TINY, "mlp_only_layers": [1, 2]})
    with pytest.raises(ValueError, match="does config.json match the weights"):
        framework.load_model(path)


def keep_experts(ep_size: int, ep_rank: int) -> ExpertPlacement:
    """Expert parallelism's experts without its process group: rank ep_rank's block of every MoE layer."""
    return ExpertPlacement(ep_size, ep_rank)


@pytest.mark.parametrize("layout", ["per_expert", "fused", "stacked"])
def test_expert_block_reads_only_its_slice(stock_and_dirs, layout):
    stock, dirs, _ = stock_and_dirs
    part = framework.load_model(dirs[layout], backend="eager", placement=keep_experts(4, 1))  # experts 2..3
    full = stock.state_dict()
    for name, tensor in part.state_dict().items():
        expected = full[name][2:4] if ".mlp.experts." in name else full[name]
        assert torch.equal(tensor, expected), name
    assert part.model.layers[0].mlp.experts.gate_up_proj.is_meta is False


def test_random_init_is_the_same_whatever_expert_block_is_kept():
    full = framework.load_model(dict(TINY), backend="eager", seed=5)
    part = framework.load_model(dict(TINY), backend="eager", seed=5, placement=keep_experts(2, 1))  # experts 4..7
    for name, tensor in part.state_dict().items():
        expected = full.state_dict()[name]
        assert torch.equal(tensor, expected[4:8] if ".mlp.experts." in name else expected), name


# ---------------------------------------------------------------------------------------------------------------------
# tie_word_embeddings: lm_head.weight is embed_tokens.weight (issue #16 item 9: the tie made on the meta device did not
# survive to_empty, leaving the LM head uninitialised memory)

TIED = {**TINY, "tie_word_embeddings": True}


def run_tool(name: str, *argv: str) -> int:
    return run_cli(load_tool(name).main, name, list(argv))


def assert_tied(model: framework.Qwen3MoeCausalLM) -> None:
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in dict(model.named_parameters())  # one parameter: ZeRO, meta.json, export see it once


@pytest.fixture(scope="module")
def tied_dirs(tmp_path_factory):
    """A tied model saved by stock transformers (hub per-expert layout) and merged by tools/moe_merge.py."""
    root = tmp_path_factory.mktemp("tied")
    stock = stock_model(tie_word_embeddings=True)
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    per_expert, merged = str(root / "per_expert"), str(root / "merged")
    stock.save_pretrained(per_expert)
    keys = set(load_file(os.path.join(per_expert, "model.safetensors")))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys and "lm_head.weight" not in keys
    assert run_tool("moe_merge", "--raw_hf_path", per_expert, "--merge_hf_path", merged, "--quiet") == 0
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_safetensors_dir(merged)
    return stock, {"per_expert": per_expert, "merged": merged}


@pytest.mark.parametrize("layout", ["per_expert", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_checkpoint_loads_tied_with_stock_logits(tied_dirs, layout, dtype):
    stock, dirs = tied_dirs
    model = framework.load_model(dirs[layout], backend="grouped_mm", attn_implementation="eager", dtype=dtype)
    assert_tied(model)
    assert model.lm_head.weight.dtype == dtype
    # the LM head holds the embedding's values (before the fix: NaN / 1e37 / zeros from torch.empty)
    assert torch.equal(model.lm_head.weight, stock.model.embed_tokens.weight.to(dtype))
    ids, mask, _ = batch()
    real = mask.bool()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        ref = stock(input_ids=ids, attention_mask=mask).logits
    if dtype == torch.float32:
        torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-6)
    else:  # bf16 weights and activations against the fp32 reference (as test_bf16_forward_close_to_fp32)
        assert rel_err(out[real].float(), ref[real]) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_init_of_a_tied_config_is_tied(dtype):
    tied = framework.load_model(dict(TIED), backend="eager", seed=1, dtype=dtype)
    untied = framework.load_model(dict(TINY), backend="eager", seed=1, dtype=dtype)
    assert_tied(tied)
    weight = tied.lm_head.weight
    assert weight.dtype == dtype and torch.isfinite(weight).all()
    assert 0.015 < weight.float().std().item() < 0.025  # initializer_range 0.02, drawn once for the shared weight
    # the same draw as an untied model's embedding (seeded by name); the untied LM head is a different draw
    assert torch.equal(weight, untied.model.embed_tokens.weight)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_tie_survives_placement_and_dtype_moves():
    model = framework.load_model(dict(TIED), backend="eager", seed=2, placement=keep_experts(2, 1))
    assert_tied(model)
    model.to(torch.bfloat16)
    assert_tied(model)
    model.to_empty(device="cpu")  # every re-materialisation re-ties (nn.Module._apply)
    assert_tied(model)


def test_tied_checkpoint_with_lm_head_only_or_equal_or_different(tied_dirs, tmp_path):
    """transformers' rules: either key alone feeds the shared weight; both must be equal (transformers would warn and
    untie, which is not the model config.json describes: one-line error)."""
    stock, dirs = tied_dirs
    sd = load_file(os.path.join(dirs["per_expert"], "model.safetensors"))
    embed = sd["model.embed_tokens.weight"]
    head_only = {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in sd.items()}
    model = framework.load_model(write_checkpoint(str(tmp_path / "head_only"), head_only, TIED), backend="eager")
    assert_tied(model)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    model = framework.load_model(write_checkpoint(str(tmp_path / "both"), {**sd, "lm_head.weight": embed.clone()},
                                                  TIED), backend="eager")
    assert_tied(model)
    assert torch.equal(model.lm_head.weight, embed)
    different = write_checkpoint(str(tmp_path / "different"), {**sd, "lm_head.weight": embed + 1}, TIED)
    with pytest.raises(ValueError, match=r"^\S*different: config.json has tie_word_embeddings true but the "
                                         r"checkpoint's lm_head.weight differs from model.embed_tokens.weight; set "
                                         r"tie_word_embeddings false to load them untied$"):
        framework.load_model(different)
    neither = write_checkpoint(str(tmp_path / "neither"),
                               {k: v for k, v in sd.items() if k != "model.embed_tokens.weight"}, TIED)
    with pytest.raises(ValueError, match=r"checkpoint has no tensor model.embed_tokens.weight \(shape \[96, 32\]\)"):
        framework.load_model(neither)


@pytest.mark.parametrize("fmt", ["hf", "merged"])
def test_export_of_a_tied_model_reloads_tied_in_stock_transformers(tied_dirs, tmp_path, fmt):
    """framework.checkpoint.live_export's gather + checkpoint.hf_export's writer, single process (ZeRO off, EP 1)."""
    stock, dirs = tied_dirs
    model = framework.load_model(dirs["per_expert"], backend="grouped_mm", attn_implementation="eager")
    out = str(tmp_path / fmt)
    groups = ParallelGroups(ep_size=1, ep_rank=0, ep_group=None, edp_group=None, group_name="ep_size_1")
    write_hf_directory(out, iter_full_parameters(model, groups, torch.float32), hf_config_dict(model.config), fmt)
    written = read_safetensors_dir(out)
    assert "lm_head.weight" not in written  # what save_pretrained writes for a tied model
    assert torch.equal(written["model.embed_tokens.weight"], stock.model.embed_tokens.weight)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                          attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids, mask, _ = batch()
    with torch.no_grad():
        theirs = reloaded.eval()(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=1e-5, atol=1e-6)
    assert_tied(framework.load_model(out, backend="eager"))
