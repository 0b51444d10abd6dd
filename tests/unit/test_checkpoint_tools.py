"""tools/moe_merge.py, tools/moe_split.py, tools/download_hf_model.py: real checkpoints of a tiny Qwen3-MoE written by
stock transformers 5, converted, reloaded by stock transformers 5 and compared logit for logit and byte for byte; and
every one-line error a user can cause."""

from __future__ import annotations

import errno
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

from framework.checkpoint import expert_convert, hf_writer
from framework.checkpoint.cli import run_cli
from framework.checkpoint.hf_writer import INDEX_NAME
from tests.helpers import load_tool, read_safetensors_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# H != I and H != 2I, so a gate/up swap or a missing transpose cannot go unnoticed.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            mlp_only_layers=[1], max_position_embeddings=64, norm_topk_prob=True)
EXTRA_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 64}',
               "merges.txt": "a b\n", "sub/notes.md": "kept\n"}


merge_tool, split_tool, download_tool = (load_tool(n) for n in ("moe_merge", "moe_split", "download_hf_model"))


def run_tool(tool, prog: str, *argv: str) -> int:
    return run_cli(tool.main, prog, list(argv))


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
    keys = set(read_safetensors_dir(ckpts["raw"]))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys
    assert not any("mlp.experts" in k for k in keys if ".layers.1." in k)  # the dense layer
    assert len([n for n in os.listdir(ckpts["raw"]) if n.endswith(".safetensors")]) > 2


def test_merged_layout_files_and_marker(ckpts, merged):
    tensors = read_safetensors_dir(merged)
    original = read_safetensors_dir(ckpts["raw"])
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
    assert_same_tensors(read_safetensors_dir(ckpts["raw"]), read_safetensors_dir(out))
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
    original, fused = read_safetensors_dir(raw), read_safetensors_dir(merged)
    assert "lm_head.weight" not in original and "lm_head.weight" not in fused  # tied: stays implicit
    assert {v.dtype for v in fused.values()} == {torch.bfloat16}
    assert_same_tensors(original, read_safetensors_dir(split))
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
    stacked = write_single(str(tmp_path / "stacked"), to_stacked(read_safetensors_dir(merged)), config)
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", stacked, "--merge_hf_path", str(tmp_path / "m"),
                    "--quiet") == 0
    assert_same_tensors(read_safetensors_dir(merged), read_safetensors_dir(str(tmp_path / "m")))
    assert run_tool(split_tool, "moe_split", "--merge_hf_path", stacked, "--output_hf_path", str(tmp_path / "s"),
                    "--quiet", "--verify") == 0
    assert_same_tensors(read_safetensors_dir(ckpts["raw"]), read_safetensors_dir(str(tmp_path / "s")))


def test_overwrite_and_atomic_failure(ckpts, merged, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("old")
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--quiet") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["stale.txt"]

    # A failure half-way (disk full in the background writer, say) leaves the old output as it was and no temporary
    # directory; the error reaches the command line as one line.
    calls = {"n": 0}
    real_write_all = hf_writer.sio.write_all

    def failing_write_all(fd, data, offset=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_write_all(fd, data, offset)

    monkeypatch.setattr(hf_writer.sio, "write_all", failing_write_all)
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--overwrite",
                    "--max_shard_size", "30KB", "--quiet") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert calls["n"] >= 5 and os.listdir(out) == ["stale.txt"] and os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()

    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--overwrite",
                    "--quiet") == 0
    assert not os.path.exists(os.path.join(out, "stale.txt")) and os.listdir(tmp_path) == ["out"]
    assert_same_tensors(read_safetensors_dir(merged), read_safetensors_dir(out))


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
    tensors = read_safetensors_dir(ckpts["raw"])
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
    "config_expert_counts_disagree": (None, lambda c: c.update(num_experts=8, num_local_experts=6),
                                      r"config.json: num_experts=8 and num_local_experts=6 disagree$"),
    "config_unsupported_family": (None, lambda c: c.update(model_type="llama"),
                                  r"config.json: model_type is 'llama', which is not supported; supported: \w+"),
    "config_missing_fields": (None, lambda c: [c.pop(k) for k in ("hidden_size", "num_local_experts")],
                              r"config.json: missing required Qwen3-MoE field\(s\) hidden_size, num_experts$"),
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


def _edit_index(src: str, dst: str, edit) -> dict:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, INDEX_NAME)) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(os.path.join(dst, INDEX_NAME), "w") as f:
        json.dump(index, f)
    return index


@pytest.mark.parametrize("tool, prog, flags", [
    (merge_tool, "moe_merge", ("--raw_hf_path", "--merge_hf_path")),
    (split_tool, "moe_split", ("--merge_hf_path", "--output_hf_path")),
])
def test_index_and_shards_agree_both_ways(ckpts, merged, tmp_path, capsys, tool, prog, flags):
    """A tensor in a shard but not in the index used to be dropped from the output, and --verify agreed."""
    raw = ckpts["raw"] if tool is merge_tool else merged
    with open(os.path.join(raw, INDEX_NAME)) as f:
        index = json.load(f)["weight_map"]

    def run(src: str) -> str:
        assert run_tool(tool, prog, flags[0], src, flags[1], str(tmp_path / "o"), "--verify", "--quiet") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
        assert not os.path.exists(tmp_path / "o") and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        return err

    norm_shard = index["model.norm.weight"]
    src = str(tmp_path / "unlisted")
    _edit_index(raw, src, lambda m: m.pop("model.norm.weight"))
    assert (f"{os.path.join(src, norm_shard)}: tensor model.norm.weight is in the shard but not in {INDEX_NAME}; "
            "add it to weight_map or re-create the index") in run(src)

    src = str(tmp_path / "phantom")
    _edit_index(raw, src, lambda m: m.update({"model.extra.weight": norm_shard}))
    assert (f"{src}: missing tensor model.extra.weight in shard {norm_shard} named by the index (no shard holds it)"
            in run(src))

    src = str(tmp_path / "extra_shard")
    extra = "model-00099-of-00099.safetensors"
    shutil.copytree(raw, src)
    save_file({"model.stray.weight": torch.zeros(2)}, os.path.join(src, extra))
    assert (f"{os.path.join(src, extra)}: shard holds 1 tensor(s) (e.g. model.stray.weight) that {INDEX_NAME} does "
            "not name; add them to weight_map or remove the shard") in run(src)


# ---- temporary directories left by killed runs ----

from framework.checkpoint import atomic_dir  # noqa: E402

# Enters atomic_output_dir(argv[1]), prints the temporary directory, then waits on stdin: killed there, it leaves what a
# conversion killed mid-write leaves. Loads atomic_dir.py by path, so the child does not import torch.
WRITER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("atomic_dir", sys.argv[2])
atomic_dir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic_dir)
with atomic_dir.atomic_output_dir(sys.argv[1]) as tmp:
    with open(os.path.join(tmp, "model-00001-of-00002.safetensors"), "w") as f:
        f.write("half")
    print(tmp, flush=True)
    sys.stdin.read()
"""


def start_writer(out: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, out, atomic_dir.__file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_dir_of_a_live_run_is_named_and_of_a_killed_run_removed(ckpts, merged, tmp_path, capsys):
    out = str(tmp_path / "out")
    proc, tmp = start_writer(out)
    try:
        assert tmp == f"{out}.tmp-{proc.pid}"
        with open(os.path.join(tmp, atomic_dir.OWNER_FILE)) as f:
            assert json.load(f)["pid"] == proc.pid
        assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out,
                        "--quiet") == 2
        assert capsys.readouterr().err == (f"moe_merge: error: output {out}: {tmp} is being written by pid "
                                           f"{proc.pid} on this host; wait for it to finish or stop it\n")
        assert sorted(os.listdir(tmp_path)) == [os.path.basename(tmp)]
    finally:
        proc.kill()
        proc.wait()
    assert os.path.isdir(tmp)  # what SIGKILL leaves behind
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", ckpts["raw"], "--merge_hf_path", out, "--quiet") == 0
    assert capsys.readouterr().err == f"note: removed {tmp}, left by a run that died (pid {proc.pid} on this host)\n"
    assert os.listdir(tmp_path) == ["out"] and atomic_dir.OWNER_FILE not in os.listdir(out)
    assert_same_tensors(read_safetensors_dir(merged), read_safetensors_dir(out))


def test_temp_dirs_of_dead_pids_other_hosts_and_unknown_owners(tmp_path, capsys):
    out = str(tmp_path / "out")

    def left_behind(pid: int, owner: dict | None) -> str:
        tmp = f"{out}.tmp-{pid}"
        os.mkdir(tmp)
        if owner is not None:
            with open(os.path.join(tmp, atomic_dir.OWNER_FILE), "w") as f:
                json.dump(owner, f)
        return tmp

    pid = dead_pid()
    stale = left_behind(pid, {"host": atomic_dir.socket.gethostname(), "pid": pid, "started": None})
    (tmp_path / "out.tmp-x").mkdir()  # not ours: no pid
    with atomic_dir.atomic_output_dir(out) as tmp:
        assert not os.path.exists(stale) and os.path.isfile(os.path.join(tmp, atomic_dir.OWNER_FILE))
    assert capsys.readouterr().err == f"note: removed {stale}, left by a run that died (pid {pid} on this host)\n"
    assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == ["out", "out.tmp-x"]

    # A live process whose start time differs from the recorded one took over a dead run's pid: stale.
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        reused = left_behind(other.pid, {"host": atomic_dir.socket.gethostname(), "pid": other.pid, "started": "1"})
        atomic_dir.check_output_path(out, overwrite=True)
        assert atomic_dir.remove_stale_temp_dirs(out, note=lambda _msg: None) == [reused]
        honest = left_behind(other.pid, {"host": atomic_dir.socket.gethostname(), "pid": other.pid,
                                         "started": atomic_dir._process_start(other.pid)})
        with pytest.raises(FileExistsError, match=re.escape(f"{honest} is being written by pid {other.pid} on this")):
            atomic_dir.check_output_path(out, overwrite=True)
        shutil.rmtree(honest)
    finally:
        other.kill()
        other.wait()

    remote = left_behind(pid, {"host": "some-other-node", "pid": pid})
    with pytest.raises(FileExistsError) as info:
        atomic_dir.check_output_path(out, overwrite=True)
    assert str(info.value) == (f"output {out}: {remote} belongs to pid {pid} on host some-other-node, which cannot be "
                               f"checked from here; remove it if no run on some-other-node is writing {out}")
    shutil.rmtree(remote)

    unknown = left_behind(pid, None)
    with pytest.raises(FileExistsError, match=re.escape(f"{unknown} has no readable owner record "
                                                        f"({atomic_dir.OWNER_FILE}); remove it if no run is writing")):
        with atomic_dir.atomic_output_dir(out, overwrite=True):
            pass
    assert os.path.isdir(unknown) and sorted(os.listdir(tmp_path)) == ["out", os.path.basename(unknown), "out.tmp-x"]


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


# ---- the I/O underneath: safetensors_io and the streaming ShardedWriter ----

from framework.checkpoint import safetensors_io as sio  # noqa: E402
from framework.checkpoint.hf_reader import HFCheckpoint  # noqa: E402


def test_group_reads_cover_every_byte_once():
    ranges = [(0, 10, "a"), (10, 5, "b"), (100, 70, "c"), (15, 0, "empty"), (400, 3, "d")]
    reads = sio.group_reads(ranges, chunk=32, max_gap=40)
    got: dict[str, list[tuple[int, int]]] = {}
    for start, span, parts in reads:
        assert span <= 32 or len(parts) == 1
        for rel, n, tag, pos in parts:
            assert 0 <= rel and rel + n <= span
            got.setdefault(tag, []).append((start + rel - pos, pos, n))
    for offset, nbytes, tag in ranges:
        pieces = sorted(got[tag], key=lambda p: p[1])
        assert all(p[0] == offset for p in pieces)  # every piece maps back to its range's start
        assert sum(p[2] for p in pieces) == nbytes and [p[1] for p in pieces] == list(range(0, max(nbytes, 1), 32))


def test_read_ranges_fills_buffers(tmp_path):
    data = bytes(range(256)) * 64  # 16 KB
    path = tmp_path / "blob"
    path.write_bytes(data)
    spans = [(5, 100), (105, 3), (4000, 9000), (300, 1)]
    bufs = [memoryview(bytearray(n)) for _, n in spans]
    fd = os.open(path, os.O_RDONLY)
    try:
        sio.read_ranges(fd, [(o, b) for (o, _), b in zip(spans, bufs)], chunk=1000, max_gap=50)
    finally:
        os.close(fd)
    assert [bytes(b) for b in bufs] == [data[o:o + n] for o, n in spans]


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], "truncated or trailing bytes"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "header is not valid JSON"),
    (lambda raw: raw[:4], "not a safetensors file"),
])
def test_corrupt_shard_is_a_one_line_error(ckpts, tmp_path, capsys, damage, message):
    src = str(tmp_path / "in")
    shutil.copytree(ckpts["raw"], src)
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    with open(os.path.join(src, shard), "rb") as f:
        raw = f.read()
    with open(os.path.join(src, shard), "wb") as f:
        f.write(damage(raw))
    assert run_tool(merge_tool, "moe_merge", "--raw_hf_path", src, "--merge_hf_path", str(tmp_path / "o"),
                    "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and shard in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"big.{i}": torch.randn(64, 64, generator=g) for i in range(6)}  # 16 KB each: streamed below
    for i in range(3):  # page-aligned memory goes to the disk as it is, the rest through a bounce buffer
        out[f"big.{i}"] = sio.aligned_empty((64, 64), torch.float32).copy_(out[f"big.{i}"])
    out["odd.bf16"] = torch.randn(3, 5, generator=g).to(torch.bfloat16)  # 30 bytes: waits, and stays aligned
    out["small.f32"] = torch.randn(7, generator=g)
    out["int.i64"] = torch.arange(5)
    out["empty"] = torch.zeros(0, 4)
    return out


@pytest.mark.parametrize("direct", ["direct", "none", "refused"])
def test_streaming_writer_roundtrip(tmp_path, monkeypatch, direct):
    """Streamed tensors (in parts, out of order), waiting small ones of several dtypes, a header that outgrows its
    reserve, with direct I/O, without, and refused at the first write: safetensors reads back every tensor byte for
    byte."""
    monkeypatch.setattr(hf_writer, "STREAM_MIN_BYTES", 4096)
    monkeypatch.setattr(hf_writer.ShardedWriter, "_header_reserve", lambda self, shard, first: 4088)  # tiny
    opened, direct_fds = [], set()
    real_open_direct, real_pwritev_all = sio.open_direct, sio.pwritev_all

    def open_direct(path):
        opened.append(path)
        fd = real_open_direct(path) if direct != "none" else None
        direct_fds.add(fd)
        return fd

    def pwritev_all(fd, views, offset):
        if direct == "refused" and fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev_all(fd, views, offset)

    monkeypatch.setattr(sio, "open_direct", open_direct)
    monkeypatch.setattr(sio, "pwritev_all", pwritev_all)
    tensors = _tensors(0)
    long_names = {f"a.really.long.tensor.name.to.grow.the.header.{'x' * 40}.{i}": torch.full((1024,), float(i))
                  for i in range(60)}  # 4 KB each: streamed; 60 long names make the header outgrow 4088 bytes
    writer = hf_writer.ShardedWriter(str(tmp_path), "200KB", {"expert_layout": "fused"})
    sink = writer.begin("parts", (32, 128), torch.float32)
    whole = torch.randn(32, 128)
    for i in reversed(range(4)):  # parts out of order, one as raw bytes
        part = whole[8 * i:8 * (i + 1)]
        sink.write(i * part.numel() * 4, part.contiguous().view(torch.uint8) if i == 2 else part)
    for key, value in {**tensors, **long_names}.items():
        writer.add(key, value)
    sink.close()
    index = writer.close()
    expected = {**tensors, **long_names, "parts": whole}
    assert_same_tensors(expected, read_safetensors_dir(str(tmp_path)))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    assert len(set(index["weight_map"].values())) > 1 and opened
    for shard in set(index["weight_map"].values()):
        header = sio.read_header(os.path.join(tmp_path, shard))
        for info in header.tensors.values():  # every tensor aligned to its element size
            assert info.start % DTYPE_SIZE[info.dtype] == 0
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


DTYPE_SIZE = {name: dtype.itemsize for name, dtype in sio.DTYPES.items()}


def test_writer_fence_copies_waiting_tensors_and_errors_surface(tmp_path, monkeypatch):
    writer = hf_writer.ShardedWriter(str(tmp_path / "a"), "5GB")
    os.makedirs(tmp_path / "a")
    buffer = torch.arange(10, dtype=torch.float32)
    writer.add("small", buffer[:4])  # waits for the end of the shard, in the caller's memory
    assert writer.written().wait(10)
    buffer.zero_()  # the caller reuses its memory after the fence
    writer.close()
    assert torch.equal(read_safetensors_dir(str(tmp_path / "a"))["small"], torch.arange(4, dtype=torch.float32))

    os.makedirs(tmp_path / "b")
    writer = hf_writer.ShardedWriter(str(tmp_path / "b"), "5GB")
    monkeypatch.setattr(hf_writer.sio, "write_all", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    writer.add("x", torch.zeros(3))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    with pytest.raises(RuntimeError):
        writer.add("y", torch.zeros(3))


def test_reader_rows_and_experts_match_safetensors(ckpts, merged):
    first = sorted(n for n in os.listdir(merged) if n.endswith(".safetensors"))[0]
    with HFCheckpoint(merged) as a, safe_open(os.path.join(merged, first), framework="pt") as f:
        for key in f.keys():
            assert torch.equal(a.get(key), f.get_tensor(key))
            if f.get_slice(key).get_shape():
                n = f.get_slice(key).get_shape()[0]
                for lo, hi in ((0, 1), (1, n), (n - 1, n + 5), (3, 2)):
                    assert torch.equal(a.get_rows(key, lo, hi), f.get_slice(key)[lo:hi]), (key, lo, hi)
        gate_up, down = a.read_layer_experts(2, 8, 32, 24, expert_range=(3, 6))
        for i, e in enumerate(range(3, 6)):
            g, u, d = a.read_expert(2, e, 32, 24)
            assert torch.equal(gate_up[i], torch.cat([g, u])) and torch.equal(down[i], d)


def test_streamed_conversion_with_a_small_ring_is_byte_exact(tmp_path, monkeypatch):
    """The path large checkpoints take, at a small scale: every tensor streamed (direct I/O where the shapes allow
    it), input read through a ring of two 8 KB buffers that are reused as soon as the writer is done with them."""
    monkeypatch.setattr(hf_writer, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(expert_convert, "READ_BYTES", 8192)
    monkeypatch.setattr(expert_convert, "RING_BUFFERS", 2)
    hidden, inter, experts = 64, 32, 6  # 8 KB per matrix in fp32: direct writes straight from the ring
    config = dict(TINY, hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_hidden_layers=2,
                  mlp_only_layers=[], head_dim=16)
    g = torch.Generator().manual_seed(5)
    tensors = {"model.embed_tokens.weight": torch.randn(64, hidden, generator=g),
               "model.norm.weight": torch.randn(hidden, generator=g),
               "lm_head.weight": torch.randn(64, hidden, generator=g)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
        tensors[p + "mlp.gate.weight"] = torch.randn(experts, hidden, generator=g)
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for e in range(experts):
            for proj, shape in shapes.items():
                tensors[f"{p}mlp.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g)
    src = write_single(str(tmp_path / "src"), tensors, config)
    merged, split = str(tmp_path / "merged"), str(tmp_path / "split")
    expert_convert.convert_checkpoint(src, merged, "fused", max_shard_size="40KB", verify=True)
    expert_convert.convert_checkpoint(merged, split, "per_expert", max_shard_size="50KB", verify=True)
    assert_same_tensors(tensors, read_safetensors_dir(split))
    fused = read_safetensors_dir(merged)
    e = 4
    assert torch.equal(fused["model.layers.1.mlp.experts.gate_up_proj"][e],
                       torch.cat([tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"],
                                  tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]]))
