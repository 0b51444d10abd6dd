"""Every user error of issue #15's list through launch/pretrain.py: one line on stderr, exit code 2, before DeepSpeed
starts (no engine; an output directory the run created is removed again with its lock, so nothing is left). And the default config on any number of
processes: the global batch follows the world size when the user set none."""

from __future__ import annotations

import json
import os

import pytest

from framework.config import load_run_config
from framework.config.plan import resolve_plan
from tests.distributed.test_pretrain import REPO, run, train_records, write_corpus
from tests.distributed.test_elastic_resume import launch

DEMO_YAML = os.path.join(REPO, "model_configs", "demo.yaml")


def one_line_exit_2(proc, message: str) -> None:
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], proc.stderr[-3000:]
    assert "DeepSpeed: ZeRO" not in proc.stdout


def _corpus(tmp_path, kind: str) -> str:
    path = tmp_path / {"empty": "empty.jsonl", "nul": "bin.jsonl", "elf": "tool.txt", "field": "docs.jsonl",
                       "utf8": "latin.txt"}[kind]
    if kind == "empty":
        path.write_text("")
    elif kind == "nul":
        path.write_bytes(b'{"text": "fine"}\n{"text": "bro\x00ken"}\n')
    elif kind == "elf":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    elif kind == "field":
        path.write_text('{"text": "one"}\n{"body": "two"}\n')
    else:
        path.write_bytes("caf\u00e9\n".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("empty", "no documents"),
    ("nul", "bin.jsonl:2: NUL byte"),
    ("elf", "ELF executable"),
    ("field", "docs.jsonl:2: no field 'text' (fields found: body)"),
    ("utf8", "latin.txt:1: invalid UTF-8"),
])
def test_bad_corpus(tmp_path, kind, message):
    path = _corpus(tmp_path, kind)
    one_line_exit_2(run([f"data.paths=[{path}]", f"train.output_dir={tmp_path / 'out'}"], timeout=120), message)
    assert not os.path.exists(tmp_path / "out")  # bad input leaves nothing behind, not even the run's lock


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "train.jsonl"), 50, 0)


def _dense_model(tmp_path) -> str:
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


@pytest.mark.parametrize("case", ["read_only", "under_a_file", "ep_over_world", "top_k", "dense", "batch"])
def test_bad_settings(tmp_path, corpus, case):
    settings, message = {
        "read_only": (["train.output_dir=/proc/framework-test-run"], "cannot write in /proc"),
        "under_a_file": ([f"train.output_dir={corpus}/run"], "is a file, not a directory"),
        "ep_over_world": (["parallel.ep_size=2"], "parallel.ep_size (2) must divide the number of processes (1)"),
        "top_k": (["model.hf_config.num_experts_per_tok=9"], "num_experts_per_tok (9) must be between 1 and "
                                                              "num_experts (8)"),
        "dense": ([f"model.path={_dense_model(tmp_path) if case == 'dense' else ''}", "model.hf_config=null"],
                  "model_type is 'llama', which is not supported; supported: qwen3_moe, mixtral"),
        "batch": (["train.global_batch_size=3"], "train.global_batch_size (3) must be a multiple of"),
    }[case]
    out = [] if any(s.startswith("train.output_dir") for s in settings) else [f"train.output_dir={tmp_path / 'o'}"]
    one_line_exit_2(run([f"data.paths=[{corpus}]", *out, *settings], timeout=120), message)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 16), (4, 32), (8, 64)])
def test_default_config_resolves_on_any_world_size(world, batch):
    plan = resolve_plan(load_run_config(DEMO_YAML, ["train.output_dir=/tmp/unused-plan-check"]), world)
    assert plan.cfg.train.global_batch_size == batch and plan.gas == 1
    assert plan.notes == [f"train.global_batch_size not set: {batch} (train.micro_batch_size 8 x {world} processes x "
                          "1 accumulation steps)"]
    if world > 1:  # a value the user set keeps the check and its message
        with pytest.raises(ValueError, match=r"train.global_batch_size \(8\) must be a multiple of "
                                             rf"train.micro_batch_size \(8\) x {world} processes"):
            resolve_plan(load_run_config(DEMO_YAML, ["train.global_batch_size=8",
                                                     "train.output_dir=/tmp/unused-plan-check"]), world)


def test_default_demo_runs_on_two_processes(tmp_path):
    """`deepspeed launch/pretrain.py` with no config (the demo) on 2 processes, two steps."""
    out = tmp_path / "demo"
    proc = launch(2, [f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=0", "export.at_end=false",
                      "train.save_at_end=false", "train.log_steps=1"], config=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.global_batch_size not set: 16" in proc.stdout
    assert sorted(train_records(str(out))) == [1, 2]
