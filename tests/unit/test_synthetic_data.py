"""data.synthetic: random-token batches are a pure function of (seed, sample index), resume from the sample, and train
through launch/pretrain.py with a save and a resume that continues the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from framework.data.samples import RandomRows, StepBatchLoader

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _loader(rank: int = 0, world: int = 1, seed: int = 3) -> StepBatchLoader:
    return StepBatchLoader(RandomRows(1000, 16, seed), global_batch_size=4, micro_batch_size=2, dp_rank=rank,
                           dp_world=world)


def test_batches_are_deterministic_and_resumable():
    a = _loader()
    first = [next(a) for _ in range(3)]
    assert first[0]["input_ids"].shape == (2, 16) and int(first[0]["input_ids"].max()) < 1000
    assert torch.equal(first[0]["labels"], first[0]["input_ids"])
    assert torch.equal(first[0]["position_ids"][1], torch.arange(16))
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])
    assert not torch.equal(next(_loader(seed=4))["input_ids"], first[0]["input_ids"])
    # two ranks of two hold the same samples as one rank's two micro-batches: the world size changes nothing
    assert torch.equal(next(_loader(1, 2))["input_ids"], first[1]["input_ids"])
    b = _loader()
    for _ in range(2):  # to the end of step 1
        next(b)
    resumed = _loader()
    resumed.load_state(json.loads(json.dumps(b.global_state([b.local_positions()]))))
    assert torch.equal(next(resumed)["input_ids"], first[2]["input_ids"])
    with pytest.raises(ValueError, match="kind 'packed'"):
        resumed.load_state({"format": 2, "kind": "packed"})


def _run(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config",
                           os.path.join(REPO, "model_configs", "tiny.yaml"), "data.synthetic=true", "train.log_steps=1",
                           "export.at_end=false", "train.tensorboard=false", f"train.output_dir={out}", *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def test_synthetic_run_resumes_with_the_same_losses(tmp_path):
    whole = _run(tmp_path / "whole", "train.max_steps=4", "train.save_at_end=false")
    _run(tmp_path / "split", "train.max_steps=2", "train.save_at_end=true")
    resumed = _run(tmp_path / "split", "train.max_steps=4", "train.save_at_end=false", "train.resume=auto")
    assert len(whole) == 4 and resumed[-2:] == pytest.approx(whole[-2:], rel=1e-6)


def test_synthetic_with_paths_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain.py"), "--config",
                           os.path.join(REPO, "model_configs", "tiny.yaml"), "data.synthetic=true",
                           f"data.paths=[{tmp_path}]", f"train.output_dir={tmp_path / 'x'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "data.synthetic=true" in proc.stderr.strip().splitlines()[-1]
