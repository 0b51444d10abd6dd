"""Save and resume through launch/pretrain.py on 2 GPUs (NCCL), EP=2, ZeRO-3 and ZeRO-2: the CPU tests run gloo, which
reduces CPU tensors; NCCL reduces CUDA tensors only, so every collective of the checkpoint path is exercised here.
A resumed run continues with the losses of the uninterrupted run, and evaluates to the same held-out loss (fp32 tiny
model; relative 1e-4 for GPU reduction order). The corpora are folders of .txt documents: JSON lines would need the
datasets package, which a GPU image need not have."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

from tests.distributed.test_pretrain import WORDS, run, train_records

pytestmark = pytest.mark.gpu


def write_text_corpus(folder: str, docs: int, seed: int) -> str:
    rng = random.Random(seed)
    os.makedirs(folder)
    for i in range(docs):
        with open(os.path.join(folder, f"doc{i:04d}.txt"), "w") as f:
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))))
    return folder


@pytest.mark.parametrize("stage", [3, 2])
def test_resume_on_two_gpus_continues_the_same_losses(stage, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    train = write_text_corpus(str(tmp_path / "train"), 300, 0)
    held_out = write_text_corpus(str(tmp_path / "eval"), 40, 1)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(29600 + stage + os.getpid() % 500)]
    common = [f"data.paths=[{train}]", f"data.eval_paths=[{held_out}]", "train.eval_steps=4", "train.eval_batches=2",
              "train.max_steps=4", "train.save_steps=2", "export.at_end=false",
              "parallel.ep_size=2", f"parallel.zero_stage={stage}"]
    full = run(common + [f"train.output_dir={tmp_path / 'a'}"], launcher=launcher)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    resumed = run(common + [f"train.output_dir={tmp_path / 'b'}", "--resume",
                            str(tmp_path / "a" / "checkpoints" / "step_00000002")], launcher=launcher)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = train_records(str(tmp_path / "a")), train_records(str(tmp_path / "b"))
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-9), (step, key)
    evals = [[r["eval_loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "eval_loss" in r]
             for run in ("a", "b")]
    assert len(evals[0]) == len(evals[1]) == 1 and evals[1][0] == pytest.approx(evals[0][0], rel=1e-4)


def test_resume_on_one_gpu_at_another_zero_stage(tmp_path):
    """A ZeRO-3 checkpoint resumed at ZeRO-2 on the GPU (framework/zero/reshard.py with CUDA tensors; the resharded
    path also runs when the number of GPUs changes), and a halved lr takes effect."""
    train = write_text_corpus(str(tmp_path / "train"), 300, 0)
    # keep_last=3: the run saves steps 2, 4 and 6, and step 2 is where the ZeRO-2 run resumes
    common = [f"data.paths=[{train}]", "train.max_steps=6", "train.save_steps=2", "train.keep_last=3",
              "export.at_end=false"]
    full = run(common + [f"train.output_dir={tmp_path / 'a'}", "parallel.zero_stage=3"])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    start = str(tmp_path / "a" / "checkpoints" / "step_00000002")
    z2 = run(common + [f"train.output_dir={tmp_path / 'b'}", "parallel.zero_stage=2", "--resume", start])
    assert z2.returncode == 0, z2.stdout[-3000:] + z2.stderr[-3000:]
    assert "parallel.zero_stage 3 -> 2" in z2.stdout
    a, b = train_records(str(tmp_path / "a")), train_records(str(tmp_path / "b"))
    assert sorted(b) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-9), (step, key)
    half = run(common + [f"train.output_dir={tmp_path / 'c'}", "train.lr=5e-4", "--resume", start])
    assert half.returncode == 0, half.stdout[-3000:] + half.stderr[-3000:]
    c = train_records(str(tmp_path / "c"))
    assert [c[s]["lr"] for s in (3, 4, 5, 6)] == pytest.approx([a[s]["lr"] / 2 for s in (3, 4, 5, 6)], rel=1e-9)
