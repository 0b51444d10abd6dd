"""Elastic resume on NCCL through launch/pretrain.py: saved by 2 GPUs with EP 2 under ZeRO-3, resumed by 4 GPUs with
EP 4 and by 1 GPU with EP 1 (tests/distributed/test_elastic_resume.py does the same on gloo, where every collective
reduces CPU tensors; here the resharding of checkpoints runs with CUDA tensors). The resumed steps' losses, gradient
norms and lr equal the uninterrupted run's (fp32 tiny model; relative 1e-4 for GPU reduction order). One global
batch of 4 sequences, 1 per GPU and micro step, in every run."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.distributed.test_pretrain import run, train_records
from tests.gpu.test_resume_gpu import write_text_corpus

pytestmark = pytest.mark.gpu
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")


def _launcher(n: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
            str(29800 + n + os.getpid() % 100)]


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    base = tmp_path_factory.mktemp("elastic_gpu")
    train = write_text_corpus(str(base / "train"), 300, 0)
    common = [f"data.paths=[{train}]", "train.max_steps=8", "train.save_steps=2", "train.keep_last=4",
              "export.at_end=false", "train.global_batch_size=4", "train.micro_batch_size=1",
              "train.warmup_steps=2"]
    done = run(common + [f"train.output_dir={base / 'ref'}", "parallel.ep_size=2", "parallel.zero_stage=3"],
               launcher=_launcher(2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = train_records(str(base / "ref"))
    assert sorted(records) == list(range(1, 9))
    return base, common, records


@pytest.mark.parametrize("gpus", [4, 1])
def test_resume_at_another_world_and_ep_size(saved_on_two, gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    base, common, want = saved_on_two
    out = base / f"w{gpus}"
    got = run(common + [f"train.output_dir={out}", f"parallel.ep_size={gpus}", "--resume",
                        str(base / "ref" / "checkpoints" / "step_00000004")],
              launcher=_launcher(gpus) if gpus > 1 else None)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert f"processes 2 -> {gpus}" in got.stdout and f"parallel.ep_size 2 -> {gpus}" in got.stdout
    records = train_records(str(out))
    assert sorted(records) == [5, 6, 7, 8]
    for step in range(5, 9):
        for key in KEYS:
            assert records[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-7), (step, key)
