"""Resuming with another number of processes, ep_size or ZeRO stage, and with changed settings, through
launch/pretrain.py on CPU (gloo).

One uninterrupted run: 2 processes, EP 2, ZeRO-3, 8 steps, checkpoints at steps 4 and 6. From its step-4 checkpoint:
1 process / EP 1 (the bar), 2 processes / EP 1 / ZeRO-2; from the 1-process run's step-6 checkpoint, back to 2
processes / EP 2 / ZeRO-3. The resumed steps' losses equal the uninterrupted run's (fp32, relative 1e-4): the data
order is a function of the global sample index, and the optimizer state is resharded. The same global batch in all
runs. Then: a halved train.lr takes effect and the change is listed; a changed model shape, seq_len (without
train.allow_resume_changes) or a bad --resume are one line, exit 2, before DeepSpeed starts; a changed global batch
continues from the same sample with a printed line.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.distributed.launch import free_port, local_launcher
from tests.distributed.test_pretrain import TINY_YAML, run, train_records, write_corpus

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=8", "train.save_steps=2", "train.keep_last=4", "export.at_end=false",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2"]
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")


def deepspeed(n: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
            str(free_port())]


def launch(n: int, args: list[str], timeout: int = 400, config: str | None = TINY_YAML,
           env: dict[str, str] | None = None, launcher=deepspeed):
    """n processes through `launcher(n)` (n > 1; DeepSpeed's runner unless the test is not about the launch path:
    tests/distributed/launch.py's local_launcher starts the same ranks ~5 s sooner) or one plain process."""
    return run(args, {"OMP_NUM_THREADS": "1", **(env or {})}, launcher=launcher(n) if n > 1 else None,
               timeout=timeout, config=config)


def step_dir(out, step: int) -> str:
    return os.path.join(str(out), "checkpoints", f"step_{step:08d}")


def assert_steps_equal(got: dict, want: dict, steps: range, rel: float = 1e-4) -> None:
    for step in steps:
        for key in KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=rel, abs=1e-7), (step, key, got[step][key],
                                                                                        want[step][key])


def resume(reference, name: str, n: int, settings: list[str], source: str | None = None):
    """Resume the reference run's step-4 checkpoint (or `source`) into BASE/name with n processes; must succeed."""
    base, common, ref, _ = reference
    out = base / name
    got = launch(n, common + [f"train.output_dir={out}", *settings, "--resume", source or step_dir(ref, 4)],
                 launcher=local_launcher)
    assert got.returncode == 0, got.stderr[-4000:]
    return out, got


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("elastic")
    corpus = write_corpus(str(base / "train.jsonl"), 300, 0)
    common = [f"data.paths=[{corpus}]", *STEPS]
    out = base / "ref"
    done = launch(2, common + [f"train.output_dir={out}", "parallel.ep_size=2", "parallel.zero_stage=3"],
                  launcher=local_launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    records = train_records(str(out))
    assert sorted(records) == list(range(1, 9))
    return base, common, out, records


def test_resume_on_one_process_continues_the_two_process_run(reference):
    """The bar: saved by 2 processes with EP 2, resumed by 1 process with EP 1: steps 5-8 as if never stopped."""
    want = reference[3]
    out, got = resume(reference, "w1", 1, ["parallel.ep_size=1"])
    assert "resume: changed since" in got.stdout and "processes 2 -> 1" in got.stdout, got.stdout[-2000:]
    assert "parallel.ep_size 2 -> 1" in got.stdout
    records = train_records(str(out))
    assert sorted(records) == [5, 6, 7, 8]
    assert_steps_equal(records, want, range(5, 9))


def test_resume_on_zero2_without_expert_parallelism(reference):
    out, _ = resume(reference, "w2z2", 2, ["parallel.ep_size=1", "parallel.zero_stage=2"])
    assert_steps_equal(train_records(str(out)), reference[3], range(5, 9))


def test_back_to_two_processes_from_the_one_process_run(reference):
    base, want = reference[0], reference[3]
    one = base / "w1"
    if not os.path.isdir(step_dir(one, 6)):
        pytest.skip("needs test_resume_on_one_process_continues_the_two_process_run's checkpoint")
    out, got = resume(reference, "back", 2, ["parallel.ep_size=2", "parallel.zero_stage=3"], step_dir(one, 6))
    assert "processes 1 -> 2" in got.stdout
    records = train_records(str(out))
    assert sorted(records) == [7, 8]
    assert_steps_equal(records, want, range(7, 9))


def test_changed_lr_takes_effect(reference):
    want = reference[3]
    out, got = resume(reference, "half_lr", 1, ["train.lr=5e-4"])
    assert "train.lr 0.001 -> 0.0005" in got.stdout, got.stdout[-2000:]
    records = train_records(str(out))
    for step in range(5, 9):  # the schedule re-evaluated at the resumed step, with the new peak
        assert records[step]["lr"] == pytest.approx(want[step]["lr"] / 2, rel=1e-9), step
    assert records[5]["loss"] == pytest.approx(want[5]["loss"], rel=1e-4)  # step 5's loss precedes its update


def test_changed_global_batch_continues_from_the_same_sample(reference):
    ref = reference[2]
    out, got = resume(reference, "gbs8", 1, ["train.global_batch_size=8", "parallel.ep_size=1", "train.max_steps=6"])
    assert "train.global_batch_size 4 -> 8" in got.stdout
    with open(os.path.join(step_dir(ref, 4), "data_state.json")) as f:
        saved = json.load(f)
    with open(os.path.join(step_dir(out, 6), "data_state.json")) as f:
        after = json.load(f)
    assert saved["next_sample"] == 16 and after["next_sample"] == 16 + 2 * 8
    assert after["num_streams"] == saved["num_streams"]  # the data order is the one the run started with


@pytest.mark.parametrize("change,message", [
    (["model.hf_config.hidden_size=48"], "cannot load into this model: hidden_size 32 -> 48"),
    (["data.seq_len=48"], "data.seq_len 32 -> 48 changes what the run trains on; to continue anyway pass "
                          "train.allow_resume_changes=[data.seq_len]"),
    (["model.dtype=bf16"], "model dtype float32 -> bfloat16"),
])
def test_resume_refusals_are_one_line_before_deepspeed(reference, change, message):
    base, common, ref, _ = reference
    out = base / f"refused{abs(hash(message)) % 1000}"
    got = launch(1, common + [f"train.output_dir={out}", *change, "--resume", step_dir(ref, 4)], timeout=120)
    assert got.returncode == 2, got.stderr[-3000:]
    err = got.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: resume: ") and message in err[0], got.stderr[-3000:]
    assert "DeepSpeed: ZeRO" not in got.stdout  # stopped before any engine


def test_allowed_meaning_change_goes_on(reference):
    out, got = resume(reference, "seq48", 1, ["data.seq_len=48", "train.max_steps=5",
                                              "train.allow_resume_changes=[data.seq_len]"])
    assert "data.seq_len 32 -> 48" in got.stdout and sorted(train_records(str(out))) == [5]


def test_bar_two_processes_killed_after_step_4_then_one_process_resume_auto(reference):
    """Issue #15's bar as written: `deepspeed --num_gpus 2 ... parallel.ep_size=2` saves at step 4 (and dies there),
    `deepspeed --num_gpus 1 ... parallel.ep_size=1 --resume auto` in the same output directory continues, steps 5-8
    match the uninterrupted 2-process run, and metrics.jsonl reads 1..8 once."""
    base, common, _, want = reference
    out = base / "bar"
    killed = launch(2, common + [f"train.output_dir={out}", "parallel.ep_size=2"],
                    env={"FRAMEWORK_FAULT": "after_save:4"})
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text() == "step_00000004"
    got = run(common + [f"train.output_dir={out}", "parallel.ep_size=1", "--resume", "auto"],
              {"OMP_NUM_THREADS": "1"}, launcher=deepspeed(1), timeout=400)
    assert got.returncode == 0, got.stderr[-4000:]
    assert f"resumed from {step_dir(out, 4)} at step 4" in got.stdout
    records = train_records(str(out))
    assert sorted(records) == list(range(1, 9))
    assert_steps_equal(records, want, range(1, 9))
