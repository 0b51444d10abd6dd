"""Engine checkpoints (framework/checkpoint/engine_state.py) and their offline HF export (tools/ds_to_hf.py) on gloo.

Tiny Qwen3-MoE, AdamW with weight decay, gradient clipping (active), WarmupLR (the learning rate changes every step), a
different batch every step. World 2: ZeRO-3 / EP 2, ZeRO-2 / EP 2, ZeRO-1 / EP 1 in fp32, ZeRO-3 / EP 2 in bf16, ZeRO-1
/ EP 2 in bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer); resumed in new processes. World 4 (experts
also sharded over EDP groups of 2): ZeRO-3 / EP 2 and ZeRO-1 / EP 2, resumed by new engines in the same processes.
- resume: 4 uninterrupted steps == 2 steps, save, a new engine loads, 2 more steps: every loss and every final fp32
  parameter bit for bit; the loaded weights (fp32 master and the module's) equal the saved ones; the step counter,
  learning rate schedule and client state come back; a run that saves and goes on is not disturbed.
- another layout: each case loads the previous case's checkpoint (another ZeRO stage and/or ep_size), and the world-4
  cases a world-2 checkpoint (CROSS_WORLD): fp32 master
  weights, module weights and Adam moments equal the saved ones exactly; another model dtype fails with one line.
- export: every tensor of the HF output equals the live model's gathered fp32 master weights at the save (cast to the
  output dtype) bit for bit, in both layouts; stock transformers loads it with no missing / unexpected key and gives
  our model's logits; bad input gives one line.
- tied word embeddings (world 2, ZeRO-3 / EP 2, its own run): the shared weight is one parameter in meta.json and the
  engine state, resume is exact, and the export has no lm_head.weight, reloads tied in stock transformers and gives
  our logits.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import framework
from framework.checkpoint.cli import run_cli
from framework.models.registry import FAMILIES
from tests.distributed.common import model_config
from tests.distributed.launch import join_runs, run_workers
from tests.helpers import load_tool, read_safetensors_dir, rel_err

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "ckpt_worker.py")
RUNS = {2: ("z3ep2", "z2ep2", "z1ep1", "z3ep2bf16", "z1ep2bf16acc32"), 4: ("z3ep2", "z1ep2")}  # world -> cases
KEYS = [f"w{world}-{case}" for world, cases in RUNS.items() for case in cases]
TAG, SAVE_AT, STEPS = "step2", 2, 4
CROSS_WORLD = {"z3ep2": "z2ep2", "z1ep2": "z3ep2"}  # world-4 case -> the world-2 checkpoint it also loads
TIED_CASE = "z3ep2tied"
FAMILIES_RESUMED = sorted(f for f in FAMILIES if f != "qwen3_moe")  # Qwen3-MoE: the cases of RUNS
FAMILY_CASES = ("z3ep2", "z2ep2")  # each loads the other's checkpoint first: ZeRO-3 <-> ZeRO-2 resharded


ds_to_hf = load_tool("ds_to_hf")


def export(*argv: str) -> int:
    return run_cli(ds_to_hf.main, "ds_to_hf", [*argv, "--quiet"])


@pytest.fixture(scope="module")
def first_world2_launch(tmp_path_factory):
    """(the RUNS output root, own_runs' directories): one world-2 launch of the worker runs the "train" phase of
    RUNS[2] and then own_runs' groups, which need no fresh processes of their own (a launch: ~5 s of start-up)."""
    out = tmp_path_factory.mktemp("train_ckpt")
    dirs = {name: str(tmp_path_factory.mktemp(f"train_ckpt_{name}")) for name in ["tied", *FAMILIES_RESUMED]}
    groups = [[str(out / "w2"), "train", *RUNS[2]], [dirs["tied"], "both", TIED_CASE]]
    groups += [[dirs[family], "both", *(f"{case}-{family}" for case in FAMILY_CASES)] for family in FAMILIES_RESUMED]
    run_workers(WORKER, join_runs(groups), world=2)
    return out, dirs


@pytest.fixture(scope="module")
def runs(first_world2_launch):
    """key -> (checkpoint root, train results, resume results)."""
    out = first_world2_launch[0]
    w2, w4 = str(out / "w2"), str(out / "w4")
    run_workers(WORKER, [w2, "resume", *RUNS[2]], world=2)  # fresh processes, fresh engines
    cross = ",".join(f"{case}={source}" for case, source in CROSS_WORLD.items())
    run_workers(WORKER, [w4, "both", *RUNS[4]], world=4, env={"CKPT_CROSS_WORLD": f"{w2};{cross}"})
    results = {}
    for world, cases in RUNS.items():
        for case in cases:
            root = os.path.join(str(out), f"w{world}", case)
            results[f"w{world}-{case}"] = (root, torch.load(os.path.join(root, "train.pt")),
                                           torch.load(os.path.join(root, "resume.pt")))
    return results


def dtype_of(key: str) -> torch.dtype:
    return torch.bfloat16 if "bf16" in key else torch.float32


def assert_all_equal(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name in expected:
        assert got[name].shape == expected[name].shape, (what, name)
        assert torch.equal(got[name], expected[name]), (what, name, rel_err(got[name], expected[name]))


@pytest.fixture(scope="module")
def own_runs(first_world2_launch):
    """The world-2 "both" runs with their own output directories (a group each, one after another in the same
    processes, after RUNS[2]'s "train" phase): "tied" -> the TIED_CASE directory, family -> that family's
    directory."""
    return first_world2_launch[1]


@pytest.fixture(scope="module")
def tied_run(own_runs):
    """(checkpoint root, train results, resume results) of TIED_CASE at world 2; "both": its resume first loads its
    own checkpoint as the "other layout" too."""
    root = os.path.join(own_runs["tied"], TIED_CASE)
    return root, torch.load(os.path.join(root, "train.pt")), torch.load(os.path.join(root, "resume.pt"))


@pytest.mark.parametrize("key", KEYS)
def test_resume_is_exact(runs, key):
    _, train, resumed = runs[key]
    assert_resume_exact(key, train, resumed)


def test_tied_resume_is_exact(tied_run):
    root, train, resumed = tied_run
    assert "lm_head.weight" not in train["at_save"] and "model.embed_tokens.weight" in train["at_save"]
    with open(os.path.join(root, TAG, "meta.json")) as f:
        params = json.load(f)["params"]
    assert "model.embed_tokens.weight" in params and "lm_head.weight" not in params
    assert_resume_exact(f"w2-{TIED_CASE}", train, resumed)


def assert_resume_exact(key: str, train: dict, resumed: dict) -> None:
    full, saved = train["full"], train["saved"]
    # the run is not trivial: the learning rate moves every step and the weights moved well beyond fp32 noise
    assert len(set(full["lrs"][1:])) == STEPS - 1, full["lrs"]
    for name, p in full["params"].items():
        assert rel_err(p, train["initial"][name]) > 1e-4, name
    if dtype_of(key) == torch.float32:
        assert_all_equal(train["at_save_module"], train["at_save"], "module weights are the fp32 master")
    # saving does not disturb the run that saved
    assert saved["losses"] == full["losses"] and saved["lrs"] == full["lrs"]
    assert_all_equal(saved["params"], full["params"], "continued after save")
    # the new engine starts exactly where the old one saved: fp32 master, module weights, counters, schedule, client
    assert_all_equal(resumed["loaded"], train["at_save"], "fp32 master after load")
    assert_all_equal(resumed["loaded_module"], train["at_save_module"], "module weights after load")
    assert resumed["global_steps"] == SAVE_AT
    assert resumed["client_state"] == {"step": SAVE_AT, "case": key.split("-", 1)[1], "data": [1, 2, 3]}
    assert resumed["lrs"] == full["lrs"][SAVE_AT:]
    # and then trains exactly like the uninterrupted run: same losses, same parameters, bit for bit
    assert resumed["losses"] == full["losses"][SAVE_AT:]
    assert_all_equal(resumed["params"], full["params"], "resumed vs uninterrupted")


@pytest.mark.parametrize("key", KEYS)
def test_load_from_another_layout(runs, key):
    """Each case also loads the previous case's checkpoint: another ZeRO stage and/or ep_size is resharded (every
    fp32 master weight, module weight and Adam moment equals the saved one exactly, and training goes on as the
    saving run did), another model dtype is refused with one line."""
    world, case = int(key[1]), key.split("-")[1]
    cases = RUNS[world]
    other, source_world = cases[cases.index(case) - 1], world
    if world == 4:  # saved at world 2
        other, source_world = CROSS_WORLD[case], 2
    cross = runs[key][2]["cross"]
    assert cross["from"] == other
    if dtype_of(key) != dtype_of(f"w{source_world}-{other}"):
        error = cross["error"]
        assert "\n" not in error and f"{other}/{TAG}: checkpoint model dtype is" in error, error
        return
    assert "error" not in cross, cross.get("error")
    saved = runs[f"w{source_world}-{other}"][1]
    assert_all_equal(cross["loaded"], saved["at_save"], "fp32 master after a resharding load")
    assert_all_equal(cross["moments"], saved["at_save_moments"], "Adam moments after a resharding load")
    assert_all_equal(cross["loaded_module"], saved["at_save_module"], "module weights after a resharding load")
    assert cross["global_steps"] == SAVE_AT
    assert cross["lrs"] == saved["saved"]["lrs"][SAVE_AT:]
    if source_world != world:
        return  # this worker's batches depend on the world size; tests/distributed/test_elastic_resume.py's do not
    # the steps after the load: the same batches, so the same losses up to the reduction order of another layout
    for got, want in zip(cross["losses"], saved["saved"]["losses"][SAVE_AT:], strict=True):
        assert abs(got - want) <= 1e-4 * abs(want) + (2e-2 if dtype_of(key) == torch.bfloat16 else 0), (got, want)


@pytest.fixture(scope="module", params=FAMILIES_RESUMED)
def family_run(request, own_runs):
    """Another family's shared experts, dense layers and buffers through save, exact resume and the resharding load:
    {case: (root, train results, resume results)} of one family at world 2."""
    out = own_runs[request.param]
    cases = [f"{case}-{request.param}" for case in FAMILY_CASES]
    return {case: (os.path.join(out, case), torch.load(os.path.join(out, case, "train.pt")),
                   torch.load(os.path.join(out, case, "resume.pt"))) for case in cases}


def test_family_resume_is_exact_and_reshards(family_run):
    for case, (_, train, resumed) in family_run.items():
        assert_resume_exact(f"w2-{case}", train, resumed)
        cross = resumed["cross"]
        assert "error" not in cross, cross.get("error")
        saved = family_run[cross["from"]][1]
        assert_all_equal(cross["loaded"], saved["at_save"], "fp32 master after a resharding load")
        assert_all_equal(cross["moments"], saved["at_save_moments"], "Adam moments after a resharding load")
        assert_all_equal(cross["loaded_module"], saved["at_save_module"], "module weights after a resharding load")
        for got, want in zip(cross["losses"], saved["saved"]["losses"][SAVE_AT:], strict=True):
            assert abs(got - want) <= 1e-4 * abs(want), (case, got, want)


def as_layout(params: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our fused parameters in the output's layout (per-expert for hf)."""
    if fmt == "merged":
        return dict(params)
    out = {}
    for name, t in params.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[:-len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[:-len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Every run in both layouts, through the command line's main (root + latest for one, tag directory for the
    other), with small shards."""
    dst = tmp_path_factory.mktemp("exports")
    paths = {}
    for key, (root, _, _) in runs.items():
        for fmt in ("hf", "merged"):
            path = str(dst / f"{key}-{fmt}")
            src = root if fmt == "hf" else os.path.join(root, TAG)
            assert export("--checkpoint", src, "--output", path, "--format", fmt, "--max_shard_size", "60KB") == 0
            paths[key, fmt] = path
    return paths


@pytest.mark.parametrize("fmt", ["hf", "merged"])
@pytest.mark.parametrize("key", KEYS)
def test_export_equals_live_weights(runs, exports, key, fmt):
    _, train, _ = runs[key]
    path = exports[key, fmt]
    dtype = dtype_of(key)  # default: the training dtype, cast from the fp32 master weights
    expected = {n: t.to(dtype) for n, t in train["at_save"].items()}
    assert_all_equal(read_safetensors_dir(path), as_layout(expected, fmt), f"{key} {fmt} export")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["metadata"]["expert_layout"] == ("per_expert" if fmt == "hf" else "fused")
    assert len(set(index["weight_map"].values())) > 1  # sharded
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert config["num_local_experts"] == model_config()["num_experts"]
    with open(os.path.join(path, "tokenizer_config.json")) as f:  # from TAG/tokenizer/
        assert json.load(f) == {"model_max_length": 64}


def our_logits(params: dict[str, torch.Tensor], ids: torch.Tensor, tied: bool = False) -> torch.Tensor:
    model = framework.load_model(model_config(tied), backend="grouped_mm", attn_implementation="eager")
    if tied:  # state_dict() names the shared weight under both keys; the checkpoint holds it once
        params = {**params, "lm_head.weight": params["model.embed_tokens.weight"]}
    model.load_state_dict(params, strict=True)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["hf", "merged"])
@pytest.mark.parametrize("key", ["w2-z3ep2", "w2-z2ep2", "w4-z3ep2"])
def test_export_loads_in_stock_transformers(runs, exports, key, fmt):
    _, train, _ = runs[key]
    model, info = AutoModelForCausalLM.from_pretrained(exports[key, fmt], output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.dtype == torch.float32
    ids = torch.randint(0, model_config()["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids).logits
    ours = our_logits(train["at_save"], ids)
    assert rel_err(theirs, ours) <= 1e-5, rel_err(theirs, ours)


@pytest.mark.parametrize("fmt", ["hf", "merged"])
def test_tied_export_reloads_tied_in_stock_transformers(tied_run, tmp_path, fmt):
    """meta.json names the shared weight once (model.embed_tokens.weight): the export writes it once, as
    save_pretrained does for a tied model, and config.json's tie_word_embeddings makes the LM head of it."""
    root, train, _ = tied_run
    path = str(tmp_path / fmt)
    assert export("--checkpoint", root, "--output", path, "--format", fmt) == 0
    assert_all_equal(read_safetensors_dir(path), as_layout(train["at_save"], fmt), f"tied {fmt} export")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, model_config()["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids).logits
    ours = our_logits(train["at_save"], ids, tied=True)
    assert rel_err(theirs, ours) <= 1e-5, rel_err(theirs, ours)
    reloaded = framework.load_model(path, backend="grouped_mm")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, train["at_save"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("key, dtype", [("w2-z3ep2", "bf16"), ("w2-z1ep2bf16acc32", "fp32")])
def test_export_other_dtype(runs, tmp_path, key, dtype):
    """bf16 from an fp32 run; and fp32 from a bf16 run: the fp32 master weights themselves, not the bf16 copy."""
    root, train, _ = runs[key]
    path = str(tmp_path / dtype)
    assert export("--checkpoint", root, "--output", path, "--format", "merged", "--dtype", dtype) == 0
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert_all_equal(read_safetensors_dir(path), {n: t.to(torch_dtype) for n, t in train["at_save"].items()}, key)
    if dtype == "fp32":
        assert any(not torch.equal(t, t.bfloat16().float()) for t in train["at_save"].values())
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["dtype"] == str(torch_dtype).removeprefix("torch.")


def test_export_errors_are_one_line(runs, tmp_path, capsys):
    src_root = runs["w2-z3ep2"][0]
    src = os.path.join(src_root, TAG)
    dst = str(tmp_path / "out")

    def fails(*argv: str) -> str:
        assert export(*argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ds_to_hf: error: "), err
        assert not os.path.exists(dst) and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        return err

    def broken(name: str) -> str:
        path = str(tmp_path / name)
        shutil.copytree(src, path)
        return path

    empty = str(tmp_path / "empty")
    os.mkdir(empty)
    assert "neither meta.json (a tag directory) nor a latest file" in fails("--checkpoint", empty, "--output", dst)
    assert "checkpoint directory not found" in fails("--checkpoint", str(tmp_path / "nowhere"), "--output", dst)
    assert "no checkpoint tag 'step9'" in fails("--checkpoint", src_root, "--tag", "step9", "--output", dst)
    stale = str(tmp_path / "stale")
    os.mkdir(stale)
    with open(os.path.join(stale, "latest"), "w") as f:
        f.write("step7\n")
    assert "latest names tag 'step7' but there is no directory" in fails("--checkpoint", stale, "--output", dst)

    no_rank = broken("no_rank")
    os.remove(os.path.join(no_rank, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert "missing rank file zero_pp_rank_1_mp_rank_00_optim_states.pt" in fails("--checkpoint", no_rank, "--output",
                                                                                   dst)
    no_meta = broken("no_meta")
    os.remove(os.path.join(no_meta, "meta.json"))
    assert "no meta.json (not a complete framework checkpoint" in fails("--checkpoint", no_meta, "--tag", ".",
                                                                        "--output", dst)
    world = broken("world")  # meta.json says 4 ranks
    with open(os.path.join(world, "meta.json")) as f:
        meta = json.load(f)
    meta["world_size"] = 4
    with open(os.path.join(world, "meta.json"), "w") as f:
        json.dump(meta, f)
    assert "topology mismatch: world_size=4 but 2 optimizer state files" in fails("--checkpoint", world, "--output",
                                                                                  dst)
    stage = broken("stage")  # rank files of a ZeRO-2 run under a ZeRO-3 meta.json
    for r in (0, 1):
        name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        shutil.copy(os.path.join(runs["w2-z2ep2"][0], TAG, name), os.path.join(stage, name))
    assert "topology mismatch with meta.json: no fp32_flat_groups" in fails("--checkpoint", stage, "--output", dst)
    no_config = broken("no_config")
    os.remove(os.path.join(no_config, "config.json"))
    assert "no config.json" in fails("--checkpoint", no_config, "--output", dst)
    bad_config = broken("bad_config")
    with open(os.path.join(bad_config, "config.json")) as f:
        config = json.load(f)
    config["moe_intermediate_size"] = 16
    with open(os.path.join(bad_config, "config.json"), "w") as f:
        json.dump(config, f)
    assert "disagrees with the checkpoint: layer 0 gate_up_proj has shape [8, 48, 32]" in fails(
        "--checkpoint", bad_config, "--output", dst)
    assert "unknown format 'gguf'; expected one of hf, merged" in fails("--checkpoint", src, "--output", dst,
                                                                        "--format", "gguf")
    assert "unknown dtype 'int8'" in fails("--checkpoint", src, "--output", dst, "--dtype", "int8")
    assert "overlaps the input" in (export("--checkpoint", src, "--output", os.path.join(src, "hf")) == 2
                                    and capsys.readouterr().err)

    # an existing output is replaced only with --overwrite
    os.mkdir(dst)
    assert export("--checkpoint", src, "--output", dst) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert export("--checkpoint", src, "--output", dst, "--overwrite") == 0
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
