"""framework/config/plan.py: the config's checks against the world size live there once; a hostfile launch passes
`describe_world` so the messages name the hostfile lines; the ZeRO search filters its trials with the same checks."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os

import pytest

from framework.cluster import describe_world, parse_hostfile, select_gpus
from framework.config import ConfigError, load_run_config
from framework.config.plan import accumulation_steps, check_parallel, resolve_plan
from framework.tuning import search_cli
from framework.tuning.search import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "model_configs", "tiny.yaml")


def _world(path: str, text: str, num_gpus: int | None = None) -> tuple[int, str]:
    with open(path, "w") as f:
        f.write(text)
    hosts = parse_hostfile(path)
    gpus = select_gpus(hosts, num_gpus, None, path, [])
    return sum(gpus.values()), describe_world(hosts, gpus, path)


def test_batch_message_names_the_hostfile_world(tmp_path):
    path = str(tmp_path / "hostfile")
    world, desc = _world(path, "a slots=8\nb slots=8\n")
    assert accumulation_steps(64, 2, world, desc) == 2
    with pytest.raises(ConfigError) as info:
        accumulation_steps(48, 2, world, desc)
    assert str(info.value) == (f"train.global_batch_size (48) must be a multiple of train.micro_batch_size (2) x 16 "
                               f"processes (2 hosts x 8 GPUs, {path} lines 1, 2) = 32; "
                               f"e.g. train.global_batch_size=64, or leave it unset to derive it")
    with pytest.raises(ConfigError, match=r"x 16 processes = 32; "):  # under a launcher: no description
        accumulation_steps(48, 2, world)


def test_ep_size_message_names_the_hostfile_world(tmp_path):
    path = str(tmp_path / "hostfile")
    world, desc = _world(path, "a slots=6\nb slots=6\nc slots=4\n")
    check_parallel(16, world, 128, 8, desc)
    with pytest.raises(ConfigError) as info:
        check_parallel(32, world, 128, 8, desc)
    assert str(info.value) == (f"parallel.ep_size (32) must divide the number of processes (16 = a:6, b:6, c:4 GPUs, "
                               f"{path} lines 1, 2, 3); choose one of [1, 2, 4, 8, 16]")
    with pytest.raises(ConfigError, match=r"^parallel.ep_size \(8\) must divide the model's num_experts \(12\)$"):
        check_parallel(8, world, 12, 2, desc)


@pytest.mark.parametrize("overrides,message", [
    (["train.global_batch_size=6"], "x 4 processes (2 hosts x 2 GPUs, {path} lines 1, 2) = 8;"),
    (["parallel.ep_size=3"], "must divide the number of processes (4 = 2 hosts x 2 GPUs, {path} lines 1, 2);"),
    (["parallel.ep_size=4", "model.hf_config.num_experts=6"], "must divide the model's num_experts (6)"),
])
def test_resolve_plan_reports_with_the_world_description(tmp_path, overrides, message):
    path = str(tmp_path / "hostfile")
    world, desc = _world(path, "a slots=2\nb slots=2\n")
    cfg = load_run_config(TINY, ["data.synthetic=true", f"train.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError) as info:
        resolve_plan(cfg, world, world_desc=desc)
    assert message.format(path=path) in str(info.value) and "\n" not in str(info.value)


def test_launch_world_describes_the_hostfile(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_script", os.path.join(REPO, "launch", "pretrain.py"))
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    path = str(tmp_path / "hostfile")
    _world(path, "a slots=8\nb slots=8\nc slots=8\n")
    assert pretrain.launch_world(["--hostfile", path, "--num_nodes", "2", "--num_gpus=4"]) == \
        (8, f"2 hosts x 4 GPUs, {path} lines 1, 2")
    with pytest.raises(FileNotFoundError, match="missing"):  # before any config check: the hostfile comes first
        pretrain.launch_world(["--hostfile", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=r"--num_nodes \(4\) exceeds the 3 host"):
        pretrain.launch_world(["--hostfile", path, "--num_nodes", "4"])


def test_search_skips_trials_the_plan_refuses(tmp_path, monkeypatch):
    """tiny.yaml: 8 experts, train.global_batch_size 4; on 4 GPUs only micro batch 1 with ep_size 1, 2 or 4 runs."""
    verdicts = {}

    def fake_run_search(config, out, trials, launcher, overrides, steps, warmup, auto, fits):
        for trial in trials:
            verdicts[(trial.micro_batch_size, trial.ep_size)] = fits(trial)
        with open(os.path.join(out, "trials.csv"), "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    monkeypatch.setattr(search_cli, "run_search", fake_run_search)
    parser = argparse.ArgumentParser()
    search_cli.add_search_args(parser)
    out = tmp_path / "search"
    out.mkdir()
    args = parser.parse_args(["--config", TINY, "--num_gpus", "4", "--out", str(out), "--micro_batch_sizes", "1,2",
                              "--ep_sizes", "3,4", "data.synthetic=true"])
    assert search_cli.run_search_command(args) == 1  # no trial ran
    assert verdicts[(1, 4)][0] and verdicts[(1, 4)][1] is not None
    assert verdicts[(1, 3)] == (False, None, "parallel.ep_size (3) must divide the number of processes (4); choose "
                                             "one of [1, 2, 4]")
    ok, estimate, why = verdicts[(2, 4)]
    assert not ok and estimate is None and why.startswith("train.global_batch_size (4) must be a multiple of "
                                                          "train.micro_batch_size (2) x 4 processes = 8;")
    # with no train.global_batch_size the run derives one per trial, so no trial is refused for the batch
    verdicts.clear()
    args.config = os.path.join(tmp_path, "no_batch.yaml")
    with open(TINY) as src, open(args.config, "w") as dst:
        dst.write(src.read().replace("  global_batch_size: 4\n", ""))
    search_cli.run_search_command(args)
    assert verdicts[(2, 4)][0]


def test_resolve_plan_accepts_mixtral_and_checks_its_expert_fields(tmp_path):
    from tests.helpers import write_mixtral_run_yaml

    yaml_path = write_mixtral_run_yaml(str(tmp_path / "mixtral.yaml"))
    common = ["data.synthetic=true", f"train.output_dir={tmp_path / 'run'}"]
    plan = resolve_plan(load_run_config(yaml_path, common), 2)
    assert plan.hf_config.model_type == "mixtral" and plan.hf_config.num_local_experts == 8
    plan = resolve_plan(load_run_config(yaml_path, [*common, "model.num_layers=2"]), 1)
    assert plan.hf_config.num_hidden_layers == 2 and "mlp_only_layers" not in plan.model_source
    for overrides, message in [
        (["parallel.ep_size=4", "model.hf_config.num_local_experts=6"],
         "parallel.ep_size (4) must divide the model's num_local_experts (6)"),
        (["model.hf_config.num_experts_per_tok=9"],
         "model num_experts_per_tok (9) must be between 1 and num_local_experts (8)"),
        (["model.hf_config.model_type=llama"], "model_type is 'llama', which is not supported"),
    ]:
        with pytest.raises(ConfigError) as info:
            resolve_plan(load_run_config(yaml_path, [*common, *overrides]), 4)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
        if "llama" in message:
            assert "qwen3_moe, mixtral" in str(info.value)


def test_search_measures_whole_layer_and_moe_half_recomputation_by_default():
    parser = argparse.ArgumentParser()
    search_cli.add_search_args(parser)
    assert parser.parse_args(["--config", TINY]).activation_checkpointing == [True, "moe"]
    assert parser.parse_args(["--config", TINY]).ep_chunks == [1, 2]  # whole and pipelined all-to-alls


def test_search_counts_the_processes_the_runner_starts(tmp_path, monkeypatch):
    """tune_zero search over a hostfile: --num_gpus G starts G processes on every host (DeepSpeed's runner), so 2 hosts
    of 4 slots with --num_gpus 2 are 4 processes; more GPUs than a host's slots is the runner's one-line error."""
    worlds = []

    def fake_run_search(config, out, trials, launcher, overrides, steps, warmup, auto, fits):
        worlds.extend(fits(trial)[2] for trial in trials)
        with open(os.path.join(out, "trials.csv"), "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    monkeypatch.setattr(search_cli, "run_search", fake_run_search)
    hostfile = str(tmp_path / "hostfile")
    with open(hostfile, "w") as f:
        f.write("node-a slots=4\nnode-b slots=4\n")
    parser = argparse.ArgumentParser()
    search_cli.add_search_args(parser)
    out = tmp_path / "search"
    out.mkdir()
    args = parser.parse_args(["--config", TINY, "--hostfile", hostfile, "--num_gpus", "2", "--out", str(out),
                              "--micro_batch_sizes", "1", "--ep_sizes", "3", "--activation_checkpointing", "on",
                              "--ep_chunks", "1", "data.synthetic=true"])
    search_cli.run_search_command(args)
    assert worlds == ["parallel.ep_size (3) must divide the number of processes (4); choose one of [1, 2, 4]"]
    args.num_gpus = 8
    with pytest.raises(ConfigError, match=r"--num_gpus \(8\) exceeds slots=4 of"):
        search_cli.run_search_command(args)


def test_files_given_to_the_demo_config_are_not_mixed_with_the_demo_data(tmp_path):
    """The demo configs (what runs without --config) set data.use_demo_corpus; a user's data.paths on top of them is
    one line saying how to train on the files alone, not a run on both."""
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "a document"}\n')
    demo = os.path.join(os.path.dirname(TINY), "demo.yaml")
    cfg = load_run_config(demo, [f"data.paths=[{corpus}]", f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"data.paths is set and data.use_demo_corpus is true .* add "
                                          r"data.use_demo_corpus=false"):
        resolve_plan(cfg, 1)
