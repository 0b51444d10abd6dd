"""Run config loading, DeepSpeed JSON building, lr schedules and the FLOPs formula, against hand-computed values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from framework.config import ConfigError, gradient_accumulation_steps, load_run_config
from framework.config.deepspeed import build_ds_config, read_ds_json
from framework.train.flops import flops_per_token
from framework.train.schedule import LRSchedule

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "model_configs")


@pytest.mark.parametrize("name", ["demo", "tiny", "qwen3-30b-a3b", "qwen3-30b-a3b-8l", "qwen3-235b-a22b"])
def test_shipped_configs_validate(name):
    cfg = load_run_config(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg.model.hf_config["num_experts"] % cfg.parallel.ep_size == 0


def test_overrides_and_yaml_numbers():
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"),
                          ["train.lr=2e-4", "parallel.ep_size=2", "data.paths=[a.jsonl, b]", "train.resume=auto"])
    assert cfg.train.lr == 2e-4 and cfg.parallel.ep_size == 2 and cfg.data.paths == ["a.jsonl", "b"]
    assert cfg.model.hf_config["vocab_size"] == 4096
    big = load_run_config(os.path.join(CONFIGS, "qwen3-30b-a3b.yaml"))
    assert big.model.hf_config["rms_norm_eps"] == 1e-6 and isinstance(big.model.hf_config["rope_theta"], float)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key train.lrr; known keys here: output_dir"),
    ("train.max_steps=ten", "train.max_steps: Input should be a valid integer"),
    ("moe.backend=fast", "moe.backend: Input should be 'auto', 'megablocks', 'grouped_mm' or 'eager'"),
    ("parallel.zero_stage=4", "parallel.zero_stage: Input should be 0, 1, 2 or 3"),
    ("train.activation_checkpointing=mlp", "train.activation_checkpointing: expected true, false, moe or attention"),
    ("train.skip_data_steps=[[3,2]]", "train.skip_data_steps: range [3, 2]: expected [[first, last], ...] optimizer"),
    ("moe.aux_loss_scope=global", "moe.aux_loss_scope: Input should be 'pooled' or 'per_layer'"),
    ("model.path=somewhere", "model: set exactly one of model.path"),
    ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than or equal to 1"),
    ("optimizer.lr=1", "unknown key optimizer; known keys here: model, data, train"),
    ("train.lr", "expected section.key=value"),
    ("train.profile_steps=[3,2]", "train.profile_steps: expected [first, last] optimizer steps with 1 <= first"),
    ("train.profile_steps=[2]", "train.profile_steps: expected [first, last]"),
    ("train.profile_steps=[0,1]", "train.profile_steps: expected [first, last]"),
    ("train.profile_steps=[2,7]", "train.profile_steps=[2, 7] ends after train.max_steps=6"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(os.path.join(CONFIGS, "tiny.yaml"), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_aux_loss_scope_default_is_transformers_pooled():
    assert load_run_config(os.path.join(CONFIGS, "tiny.yaml")).moe.aux_loss_scope == "pooled"
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["moe.aux_loss_scope=per_layer"])
    assert cfg.moe.aux_loss_scope == "per_layer"


def test_profile_steps_off_by_default():
    assert load_run_config(os.path.join(CONFIGS, "tiny.yaml")).train.profile_steps == []
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["train.profile_steps=[6,6]"])
    assert cfg.train.profile_steps == [6, 6]


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_run_config(str(bad))


def test_batch_arithmetic():
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["train.micro_batch_size=2", "train.global_batch_size=12"])
    assert gradient_accumulation_steps(cfg, 2) == 3
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(12\) must be a multiple of "
                                          r"train.micro_batch_size \(2\) x 4 processes = 8"):
        gradient_accumulation_steps(cfg, 4)


def test_ds_config_from_yaml_and_user_json(tmp_path):
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["parallel.ep_size=2"])
    ds = build_ds_config(cfg, world_size=2, bf16=True)
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    user = {"train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": 123}}
    assert build_ds_config(cfg, 2, False, user)["zero_optimization"]["reduce_bucket_size"] == 123
    for user, message in [({"train_batch_size": 8}, "train_batch_size=8 disagrees with train.global_batch_size = 4"),
                          ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' block"),
                          ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 disagrees"),
                          ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "(hpZ) cannot be combined")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_ds_config(cfg, 2, False, user, "y.json")
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=r"bad.json:1: not valid JSON"):
        read_ds_json(str(path))


def test_lr_schedules():
    cos = LRSchedule("cosine", max_steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin = LRSchedule("linear", 11, 2, 0.0)
    assert lin(6) == pytest.approx(0.5) and lin(10) == pytest.approx(0.0)
    assert LRSchedule("constant", 11, 0, 0.1)(7) == 1.0


def test_flops_per_token_qwen3_30b_a3b():
    from framework.models.qwen3_moe.config import load_hf_config

    cfg = load_run_config(os.path.join(CONFIGS, "qwen3-30b-a3b.yaml"))
    config = load_hf_config(cfg.model.hf_config)
    h, qd, kvd, inter, k, e, vocab, layers, seq = 2048, 4096, 512, 768, 8, 128, 151936, 48, 4096
    per_layer = h * qd + 2 * h * kvd + qd * h + k * 3 * h * inter + h * e
    expected = 6 * (layers * per_layer + h * vocab) + 6 * layers * seq * qd
    assert flops_per_token(config, seq) == expected
    # ~3.3B active matmul parameters: the "A3B" of the name
    assert 3.0e9 < (expected - 6 * layers * seq * qd) / 6 < 3.5e9


def test_flops_per_token_with_a_dense_layer_and_tied_head_by_hand():
    """tests/helpers.TINY: layer 1 is a dense SwiGLU MLP (mlp_only_layers), the rest MoE; tying changes nothing."""
    from tests.helpers import tiny_config

    h, qd, kvd, inter, dense, k, e, vocab, seq = 32, 32, 16, 24, 40, 2, 8, 96, 16
    attention = h * qd + 2 * h * kvd + qd * h
    matmuls = 2 * (attention + k * 3 * h * inter + h * e) + attention + 3 * h * dense + h * vocab
    expected = 6 * matmuls + 6 * 3 * seq * qd
    assert flops_per_token(tiny_config(), seq) == expected == 164352
    assert flops_per_token(tiny_config(tie_word_embeddings=True), seq) == expected


def test_cli_bad_config_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hf_config: {vocab_size: 8}\ntrain:\n  max_step: 3\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: unknown key train.max_step; known keys here: "
                                                f"{proc.stderr.split('known keys here: ')[1].strip()}"]
    assert "max_steps" in proc.stderr


@pytest.mark.parametrize("name, overrides", [("zero3_ep", ["parallel.ep_size=4"]), ("zero3_ep_offload", []),
                                             ("zero2_ep", ["parallel.zero_stage=2", "parallel.ep_size=4"]),
                                             ("zero3", [])])
def test_shipped_ds_configs_resolve(name, overrides):
    from framework.models.qwen3_moe.config import load_hf_config

    cfg = load_run_config(os.path.join(CONFIGS, "qwen3-30b-a3b-8l.yaml"), overrides)
    path = os.path.join(REPO, "ds_configs", f"{name}.json")
    ds = build_ds_config(cfg, 4, True, read_ds_json(path), path, load_hf_config(cfg.model.hf_config))
    zero = ds["zero_optimization"]
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 1
    if name != "zero3":  # auto: one layer's local experts (128/4 x 3 x 2048 x 768) and just above the router
        assert zero["reduce_bucket_size"] == 32 * 3 * 2048 * 768
    if zero["stage"] == 3 and name != "zero3":
        assert zero["stage3_prefetch_bucket_size"] == 32 * 3 * 2048 * 768
        assert zero["stage3_param_persistence_threshold"] == 128 * 2048 + 1
    assert ds["optimizer"]["params"]["torch_adam"] is (name != "zero3_ep_offload")


@pytest.mark.parametrize("user, message", [
    ({"zero_optimisation": {}}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_sizee": 1}},
     "unknown key zero_optimization.reduce_bucket_sizee; did you mean 'reduce_bucket_size'?"),
    ({"zero_optimization": {"stage": 3, "overlap_comm": "maybe"}}, "zero_optimization.overlap_comm: Input should be"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, 'sub_group_size="auto" is not resolved'),
])
def test_ds_json_key_errors(user, message):
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"))
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, 2, False, user, "y.json")
    assert str(err.value).startswith("y.json: ") and message in str(err.value) and "\n" not in str(err.value)


def test_one_process_zero12_sums_instead_of_dividing_by_one():
    """At world size 1, ZeRO-1/2 reduce with "sum" (no division of every gradient bucket by 1); averaging stays on
    for several processes and for ZeRO-3 (which refuses "sum"), and a user's own choice is kept."""
    for stage, world, expected in [(2, 1, "sum"), (1, 1, "sum"), (2, 2, None), (3, 1, None)]:
        cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), [f"parallel.zero_stage={stage}",
                                                                    "train.global_batch_size=4"])
        assert build_ds_config(cfg, world, True).get("gradient_allreduce_op") == expected, (stage, world)
    cfg = load_run_config(os.path.join(CONFIGS, "tiny.yaml"), ["parallel.zero_stage=2"])
    user = {"gradient_allreduce_op": "mean", "zero_optimization": {"stage": 2}}
    assert build_ds_config(cfg, 1, True, user)["gradient_allreduce_op"] == "mean"
