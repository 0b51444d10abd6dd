"""tools/moe_merge.py, tools/moe_split.py, tools/download_hf_model.py: real checkpoints of a tiny Qwen3-MoE written by
stock transformers 5, converted, reloaded by stock transformers 5 and compared logit for logit and byte for byte; and
every one-line error a user can cause."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from framework.checkpoint import expert_convert
from framework.checkpoint.cli import run_cli
from framework.checkpoint.hf_writer import INDEX_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# H != I and H != 2I, so a gate/up swap or a missing transpose cannot go unnoticed.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            mlp_only_layers=[1], max_position_embeddings=64, norm_topk_prob=True)
EXTRA_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 64}',
               "merges.txt": "a b\n", "sub/notes.md": "kept\n"}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge_tool, split_tool, download_tool = (load_tool(n) for n in ("moe_merge", "moe_split", "download_hf_model"))


def run_tool(tool, prog: str, *argv: str) -> int:
    return run_cli(tool.main, prog, list(argv))


def read_all(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].contiguous().view(-1).view(torch.uint8).equal(b[key].contiguous().view(-1).view(torch.uint8)), key


def write_single(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe", **config}, f)
    return path


def logits(path_or_model, ids: torch.Tensor) -> torch.Tensor:
    model = path_or_model
    if isinstance(path_or_model, str):
        model, info = AutoModelForCausalLM.from_pretrained(path_or_model, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A per-expert fp32 checkpoint in several shards (+ tokenizer files, a hidden download cache), its merged form,
    and a bf16 tied-embedding one."""
    root = tmp_path_factory.mktemp("ckpt_tools")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, tie_word_embeddings=False)).eval()
    raw = str(root / "raw")
    model.save_pretrained(raw, max_shard_size="40KB")
    for rel, text in {**EXTRA_FILES, ".cache/huggingface/x.metadata": "hub state"}.items():
        os.makedirs(os.path.dirname(os.path.join(raw, rel)), exist_ok=True)
        with open(os.path.join(raw, rel), "w") as f:
            f.write(text)
    torch.manual_seed(1)
    model_bf16 = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY, tie_word_embeddings=True)).to(torch.bfloat16).eval()
    raw_bf16 = str(root / "raw_bf16")
    model_bf16.save_pretrained(raw_bf16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    return {"root": root, "raw": raw, "raw_bf16": raw_bf16, "model": model, "model_bf16": model_bf16, "ids": ids}


@pytest.fixture(scope="module")
def merged(ckpts):
    """Merged through the command line, as a user would run it."""
    out = str(ckpts["root"] / "merged")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "moe_merge.py"), "--raw_hf_path", ckpts["raw"],
                           "--merge_hf_path", out, "--max_shard_size", "30KB", "--verify"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "merged per_expert -> fused" in proc.stdout and "verified" in proc.stdout
    return out


def test_raw_checkpoint_is_really_per_expert(ckpts):
    keys = set(read_all(ckpts["raw"]))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys
    assert not any("mlp.experts" in k for k in keys if ".layers.1." in k)  # the dense layer
    assert len([n for n in os.listdir(ckpts["raw"]) if n.endswith(".safetensors")]) > 2


def test_merged_layout_files_and_marker(ckpts, merged):
    tensors = read_all(merged)
    original = read_all(ckpts["raw"])
    for layer in (0, 2):
        gate_up, down = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"], \
            tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (8, 48, 32) and down.shape == (8, 32, 24)
        for e in (0, 5):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            assert torch.equal(gate_up[e, :24], original[p + "gate_proj.weight"])  # rows 0..I-1 gate
            assert torch.equal(gate_up[e, 24:], original[p + "up_proj.weight"])  # rows I..2I-1 up
            assert torch.equal(down[e], original[p + "down_proj.weight"])
    assert not any(".experts.0." in k for k in tensors)
    non_expert = {k: v for k, v in original.items() if ".mlp.experts." not in k}
    assert_same_tensors(non_expert, {k: v for k, v in tensors.items() if ".mlp.experts." not in k})
    with open(os.path.join(merged, INDEX_NAME)) as f:
        index = json.load(f)
    assert index["metadata"]["expert_layout"] == "fused"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    for shard in shards:  # 30KB cap; only a single tensor larger than the cap may exceed it
        with safe_open(os.path.join(merged, shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or os.path.getsize(os.path.join(merged, shard)) < 30_000 + 4096
    for rel in ["config.json", "generation_config.json", *EXTRA_FILES]:
        with open(os.path.join(ckpts["raw"], rel), "rb") as a, open(os.path.join(merged, rel), "rb") as b:
            assert a.read() == b.read(), rel
    assert not os.path.exists(os.path.join(merged, ".cache"))
    assert not [n for n in os.listdir(os.path.dirname(merged)) if ".tmp-" in n or ".old-" in n]


def test_merged_loads_in_stock_transformers_with_same_logits(ckpts, merged):
    ids = ckpts["ids"]
    torch.testing.assert_close(logits(merged, ids), logits(ckpts["model"], ids), rtol=0, atol=0)


def test_split_cli_roundtrip_is_byte_identical_and_loads(ckpts, merged):
    out = str(ckpts["root"] / "split")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "moe_split.py"), "--merge_hf_path", merged,
                           "--output_hf_path", out, "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(read_all(ckpts["raw"]), read_all(out))
    with open(os.path.join(out, INDEX_NAME)) as f:
        assert json.load(f)["metadata"]["expert_layout"] == "per_expert"
    ids = ckpts["ids"]
    torch.testing.assert_close(logits(out, ids), logits(ckpts["model"], ids), rtol=0, atol=0)


def test_bf16_tied_roundtrip(ckpts):
    root, raw = ckpts["root"], ckpts["raw_bf16"]
    merged, split = str(root / "bf16_merged"), str(root / "bf16_split")
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", raw, "--merge_hf_path", merged, "--verify",
                    "--quiet") == 0
    assert run_tool(split_tool, "moe_split", "--merge_hf_path", merged, "--output_hf_path", split, "--verify",
                    "--quiet") == 0
    original, fused = read_all(raw), read_all(merged)
    assert "lm_head.weight" not in original and "lm_head.weight" not in fused  # tied: stays implicit
    assert {v.dtype for v in fused.values()} == {torch.bfloat16}
    assert_same_tensors(original, read_all(split))
    # Both loaded the same way, so both run the same kernels (the in-memory model may pick other bf16 ones).
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, tensor in ckpts["model_bf16"].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = ckpts["ids"]
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)


def to_stacked(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in fused.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = key[: -len(".gate_up_proj")], value.shape[1] // 2
            out[prefix + ".gate_proj"], out[prefix + ".up_proj"] = value[:, :inter], value[:, inter:]
        else:
            out[key] = value
    return out


def test_stacked_input_merges_and_splits(ckpts, merged, tmp_path):
    with open(os.path.join(ckpts["raw"], "config.json")) as f:
        config = json.load(f)
    stacked = write_single(str(tmp_path / "stacked"), to_stacked(read_all(merged)), config)
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", stacked, "--merge_hf_path", str(tmp_path / "m"),
                    "--quiet") == 0
    assert_same_tensors(read_all(merged), read_all(str(tmp_path / "m")))
    assert run_tool(split_tool, "moe_split", "--merge_hf_path", stacked, "--output_hf_path", str(tmp_path / "s"),
                    "--quiet", "--verify") == 0
    assert_same_tensors(read_all(ckpts["raw"]), read_all(str(tmp_path / "s")))


def test_overwrite_and_atomic_failure(ckpts, merged, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("old")
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--quiet") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["stale.txt"]

    # A failure half-way (disk full, say) leaves the old output as it was and no temporary directory.
    calls = {"n": 0}
    real_add = expert_convert.ShardedWriter.add

    def failing_add(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real_add(self, key, tensor)

    monkeypatch.setattr(expert_convert.ShardedWriter, "add", failing_add)
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--overwrite",
                    "--quiet") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(out) == ["stale.txt"] and os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()

    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--overwrite",
                    "--quiet") == 0
    assert not os.path.exists(os.path.join(out, "stale.txt")) and os.listdir(tmp_path) == ["out"]
    assert_same_tensors(read_all(merged), read_all(out))


def test_verify_detects_a_corrupted_output(ckpts, merged, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(merged, bad)
    with open(os.path.join(bad, INDEX_NAME)) as f:
        shard = json.load(f)["weight_map"]["model.layers.2.mlp.experts.down_proj"]
    with safe_open(os.path.join(bad, shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.2.mlp.experts.down_proj"][3, 0, 0] += 1
    save_file(tensors, os.path.join(bad, shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"verify failed: layer 2 experts \(down_proj"):
        expert_convert.verify_conversion(ckpts["raw"], bad, "fused")


# ---- one-line errors, each naming the problem ----

def broken_copy(ckpts, tmp_path, edit=None, config_edit=None) -> str:
    """The raw checkpoint as one file, after `edit(tensors)` and `config_edit(config)`."""
    tensors = read_all(ckpts["raw"])
    with open(os.path.join(ckpts["raw"], "config.json")) as f:
        config = json.load(f)
    if edit:
        edit(tensors)
    if config_edit:
        config_edit(config)
    return write_single(str(tmp_path / "in"), tensors, config)


def rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


def drop_layer_experts(tensors, layer):
    for k in [k for k in tensors if k.startswith(f"model.layers.{layer}.mlp.experts.")]:
        del tensors[k]


E0 = "model.layers.0.mlp.experts"
ERROR_CASES = {
    "missing_expert": (lambda t: t.pop(f"{E0}.5.up_proj.weight"), None,
                       r"missing expert 5 of layer 0 \(model.layers.0.mlp.experts.5.up_proj.weight\)"),
    "duplicate_expert": (lambda t: t.update({f"{E0}.05.gate_proj.weight": t[f"{E0}.5.gate_proj.weight"].clone()}), None,
                         r"duplicate expert 5 of layer 0: .*experts.0?5.gate_proj.weight and .*0?5.gate_proj.weight"),
    "shape": (lambda t: t.update({f"{E0}.3.down_proj.weight": t[f"{E0}.3.down_proj.weight"].T}), None,
              r"experts.3.down_proj.weight: expected shape \[32, 24\], found \[24, 32\]"),
    "dtype": (lambda t: t.update({f"{E0}.6.gate_proj.weight": t[f"{E0}.6.gate_proj.weight"].half()}), None,
              r"experts.6.gate_proj.weight: dtype F16 differs from F32 of .*experts.0.gate_proj.weight"),
    "config_num_experts": (None, lambda c: c.update(num_local_experts=6),
                           r"layer 0 has experts 0..7 \(8\) but the config says num_experts=6"),
    "config_fewer_experts": (lambda t: [t.pop(f"{E0.replace('.0.', f'.{L}.')}.7.{p}.weight") for L in (0, 2)
                                        for p in ("gate_proj", "up_proj", "down_proj")], None,
                             r"layer 0 has experts 0..6 \(7\) but the config says num_experts=8"),
    "config_dense_layer": (None, lambda c: c.update(mlp_only_layers=[1, 2]),
                           r"layer 2 has expert tensors but .*config.json makes it a dense layer"),
    "config_hidden": (None, lambda c: c.update(moe_intermediate_size=16),
                      r"experts.0.gate_proj.weight: expected shape \[16, 32\], found \[24, 32\]"),
    "no_experts_for_moe_layer": (lambda t: drop_layer_experts(t, 2), None,
                                 r"makes layer 2 an MoE layer but the checkpoint has no expert tensors"),
    "unknown_layout": (lambda t: rename(t, f"{E0}.0.gate_proj.weight", f"{E0}.0.w1.weight"), None,
                       r"unknown expert layout: model.layers.0.mlp.experts.0.w1.weight"),
    "mixed_layouts": (lambda t: t.update({"model.layers.2.mlp.experts.gate_up_proj": torch.zeros(8, 48, 32)}), None,
                      r"mixes expert layouts"),
    "config_missing_fields": (None, lambda c: [c.pop(k) for k in ("hidden_size", "num_local_experts")],
                              r"config.json: missing field\(s\) hidden_size, num_experts \(or num_local_experts\)$"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_input_errors_are_one_line(ckpts, tmp_path, capsys, case):
    edit, config_edit, pattern = ERROR_CASES[case]
    src = broken_copy(ckpts, tmp_path, edit, config_edit)
    out = str(tmp_path / "out")
    tool, prog, flags = (merge_tool, "moe_merge", ("--raw_hf_path", "--merge_hf_path")) if case != "mixed_layouts" \
        else (split_tool, "moe_split", ("--merge_hf_path", "--output_hf_path"))
    assert run_tool(tool, prog, flags[0], src, flags[1], out, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    import re
    assert re.search(pattern, err), err
    assert sorted(os.listdir(tmp_path)) == ["in"]  # nothing written, not even a temporary directory


def test_missing_index_and_shard_and_config(ckpts, tmp_path, capsys):
    def merge(src):
        assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", src, "--merge_hf_path", str(tmp_path / "o"),
                        "--quiet") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    no_index = str(tmp_path / "no_index")
    shutil.copytree(ckpts["raw"], no_index)
    os.remove(os.path.join(no_index, INDEX_NAME))
    assert "missing index model.safetensors.index.json" in merge(no_index)

    no_shard = str(tmp_path / "no_shard")
    shutil.copytree(ckpts["raw"], no_shard)
    shards = sorted(n for n in os.listdir(no_shard) if n.endswith(".safetensors"))
    os.remove(os.path.join(no_shard, shards[1]))
    assert f"names shard(s) that are not in {no_shard}: {shards[1]}" in merge(no_shard)

    moved = str(tmp_path / "moved")  # the index maps a tensor to a shard that does not hold it
    shutil.copytree(ckpts["raw"], moved)
    with open(os.path.join(moved, INDEX_NAME)) as f:
        index = json.load(f)
    key = "model.layers.0.mlp.experts.2.up_proj.weight"
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    with open(os.path.join(moved, INDEX_NAME), "w") as f:
        json.dump(index, f)
    assert f"missing tensor {key} in shard {index['weight_map'][key]}" in merge(moved)

    no_config = str(tmp_path / "no_config")
    shutil.copytree(ckpts["raw"], no_config)
    os.remove(os.path.join(no_config, "config.json"))
    assert "no config.json" in merge(no_config)

    assert "input checkpoint directory not found" in merge(str(tmp_path / "nowhere"))
    assert "overlaps the input" in (run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path",
                                             os.path.join(ckpts["raw"], "sub", "x"), "--quiet") == 2
                                    and capsys.readouterr().err)


# ---- download ----

def test_download_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "download_hf_model.py"), "--repo_id",
                           "Qwen/Qwen3-30B-A3B", "--local_dir", str(tmp_path / "q")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "offline (HF_HUB_OFFLINE is set)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_download_passes_patterns_and_maps_hub_errors(tmp_path, monkeypatch, capsys):
    import httpx2  # what huggingface_hub's errors carry
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    seen = {}

    def fake_snapshot_download(**kwargs):
        seen.update(kwargs)
        os.makedirs(kwargs["local_dir"], exist_ok=True)
        with open(os.path.join(kwargs["local_dir"], "config.json"), "w") as f:
            f.write("{}")
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert run_tool(download_tool, "download_hf_model", "--repo_id", "Qwen/Qwen3-30B-A3B", "--local_dir",
                    str(tmp_path / "q")) == 0
    assert seen["repo_id"] == "Qwen/Qwen3-30B-A3B" and seen["local_dir"] == str(tmp_path / "q")
    assert {"*.safetensors", "*.json", "*.txt", "*.model"} <= set(seen["allow_patterns"])
    assert "1 file(s)" in capsys.readouterr().out

    def unauthorised(**kwargs):
        request = httpx2.Request("GET", "https://huggingface.co/api/models/org/private")
        raise RepositoryNotFoundError("401 Client Error.\nRepository Not Found",
                                      response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unauthorised)
    assert run_tool(download_tool, "download_hf_model", "--repo_id", "org/private", "--local_dir",
                    str(tmp_path / "p")) == 2
    err = capsys.readouterr().err
    assert err == ("download_hf_model: error: org/private: repository not found, or not visible to this token "
                   "(unauthorised? set HF_TOKEN)\n")
