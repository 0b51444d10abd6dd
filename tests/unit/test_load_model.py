"""load_model: the three checkpoint layouts, config-only construction, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import framework
from tests.helpers import TINY, batch, stock_model


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


def keep_experts(lo: int, hi: int):
    """A stand-in for expert parallelism's meta-device step: keep experts [lo, hi) of every MoE block."""
    def prepare(model):
        for block in model.moe_blocks():
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(block.experts, name)
                setattr(block.experts, name, torch.nn.Parameter(full[lo:hi].clone()))
            block.experts.first_expert, block.experts.num_experts = lo, hi - lo
    return prepare


@pytest.mark.parametrize("layout", ["per_expert", "fused", "stacked"])
def test_expert_block_reads_only_its_slice(stock_and_dirs, layout):
    stock, dirs, _ = stock_and_dirs
    part = framework.load_model(dirs[layout], backend="eager", prepare=keep_experts(2, 6))
    full = stock.state_dict()
    for name, tensor in part.state_dict().items():
        expected = full[name][2:6] if ".mlp.experts." in name else full[name]
        assert torch.equal(tensor, expected), name
    assert part.model.layers[0].mlp.experts.gate_up_proj.is_meta is False


def test_random_init_is_the_same_whatever_expert_block_is_kept():
    full = framework.load_model(dict(TINY), backend="eager", seed=5)
    part = framework.load_model(dict(TINY), backend="eager", seed=5, prepare=keep_experts(4, 8))
    for name, tensor in part.state_dict().items():
        expected = full.state_dict()[name]
        assert torch.equal(tensor, expected[4:8] if ".mlp.experts." in name else expected), name
