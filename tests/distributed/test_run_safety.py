"""launch/pretrain.py when real life interferes (issue #15): a second run into an output directory in use, a fresh run
into one holding checkpoints, a damaged newest checkpoint (truncated or deleted file), a disk too full for the next
checkpoint and a save that fails while writing. Every refusal is one `error:` line with the exit code the launcher
documents; the previous checkpoint stays `latest` and no temporary directory is left."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from framework.checkpoint.integrity import verify_checkpoint
from framework.train.run_lock import LOCK_NAME, acquire_run_lock
from tests.distributed.test_pretrain import corpus, run, train_records  # noqa: F401 - corpus: the fixture

pytestmark = pytest.mark.slow
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def common(train: str, out, max_steps: int) -> list[str]:
    return [f"data.paths=[{train}]", f"train.max_steps={max_steps}", "train.save_steps=2", "train.keep_last=3",
            "export.at_end=false", f"train.output_dir={out}"]


def test_second_run_into_a_locked_output_dir_exits_2(tmp_path, corpus):
    out = str(tmp_path / "busy")
    lock = acquire_run_lock(out)  # the first run, as far as the lock can tell
    try:
        proc = run(common(corpus[0], out, 2), timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: train.output_dir {out} is in use by another run (host {socket.gethostname()} "
                                 f"pid {os.getpid()}, lock {out}/{LOCK_NAME}); wait for it to end, or choose another "
                                 "train.output_dir"]
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # refused before anything was written


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run(common(corpus[0], out, 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fresh_run_into_a_dir_with_checkpoints_exits_2(finished, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    before = (out / "metrics.jsonl").read_text()
    proc = run(common(corpus[0], out, 4), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: train.output_dir {out} already holds checkpoints (step_00000004 in "
                                 f"{out}/checkpoints) from another run; continue it with --resume auto, or choose "
                                 "another train.output_dir"]
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint(finished, corpus, tmp_path, damage):
    """--resume of the damaged checkpoint itself: one line, exit 2. --resume auto: one warning, resumes from step 2
    and trains steps 3-4 exactly as the first run did; metrics.jsonl then reads 1..4 once each."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    root = out / "checkpoints"
    reference = train_records(str(finished))
    with open(root / "step_00000004" / "manifest.json") as f:
        size = json.load(f)["files"][OPTIM]["size"]
    damaged = root / "step_00000004" / OPTIM
    if damage == "truncate":
        os.truncate(damaged, size // 2)
        what = f"{damaged} has {size // 2} bytes, expected {size}"
    else:
        os.remove(damaged)
        what = f"{damaged} is missing"

    proc = run(common(corpus[0], out, 4) + ["--resume", str(root / "step_00000004")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: train.resume: checkpoint {root}/step_00000004 is damaged: {what}; resume "
                                 "from another checkpoint (--resume auto picks the newest whole one)"]

    proc = run(common(corpus[0], out, 4) + ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: the latest")]
    assert warnings == [f"warning: the latest checkpoint is damaged: {what}; resuming from {root}/step_00000002 "
                        "instead"]
    assert f"resumed from {root}/step_00000002 at step 2" in proc.stdout
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4]  # the first run's 3 and 4 were dropped before the resumed run logged its own
    again = train_records(str(out))
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step
    assert (root / "latest").read_text() == "step_00000004"
    assert verify_checkpoint(str(root / "step_00000004")) is None  # written again, whole


def test_every_checkpoint_damaged_exits_2(finished, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    root = out / "checkpoints"
    for step in (2, 4):
        os.remove(root / f"step_{step:08d}" / "trainer_state_rank0.pt")
    proc = run(common(corpus[0], out, 4) + ["--resume", "auto"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: the latest checkpoint is damaged: {root}/step_00000004/trainer_state_rank0.pt "
                                 f"is missing; no older checkpoint in {root} is complete either, so there is nothing "
                                 "to resume; start a fresh run in another train.output_dir"]


@pytest.mark.parametrize("fault", ["disk_full", "save_error"])
def test_disk_full_or_failed_save_stops_cleanly(tmp_path, corpus, fault):
    """FRAMEWORK_FAULT=disk_full:4: the free-space query reports 0 bytes before step 4's save; save_error:4: writing
    step 4's checkpoint fails with ENOSPC. Either way: exit 1 with one line, step 2 stays latest, no temp dir."""
    out = tmp_path / "run"
    proc = run(common(corpus[0], out, 6), env_extra={"FRAMEWORK_FAULT": f"{fault}:4"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    root = out / "checkpoints"
    last = f"the last good checkpoint is {root}/step_00000002"
    if fault == "disk_full":
        with open(root / "step_00000002" / "manifest.json") as f:
            needed = sum(d["size"] for d in json.load(f)["files"].values())  # this run's previous save
        expected = (f"error: step 4: not enough disk space to save a checkpoint in {root}: needs about {needed} bytes, "
                    f"0 bytes free; stopped before saving, {last}; free space (or lower train.keep_last) and resume "
                    "with --resume auto")
    else:
        expected = (f"error: step 4: writing the checkpoint failed (rank 0: [Errno 28] No space left on device: "
                    f"'{root}/.tmp-step_00000004/injected'); removed the partial save, {last}; resume with "
                    "--resume auto")
    assert error_lines(proc) == [expected]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(train_records(str(out))) == [1, 2, 3, 4]


def test_run_killed_before_its_first_checkpoint(tmp_path, corpus):
    """Killed in its first save: a fresh run into the directory is refused (its metrics.jsonl is another run's);
    --resume auto starts from scratch there and metrics.jsonl reads 1, 2 once, with this run's values."""
    out = tmp_path / "run"
    killed = run(common(corpus[0], out, 2), env_extra={"FRAMEWORK_FAULT": "mid_save:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = train_records(str(out))
    assert sorted(first) == [1, 2]
    proc = run(common(corpus[0], out, 2), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: train.output_dir {out} already holds another run's {out}/metrics.jsonl (and "
                                 "no checkpoint); choose another train.output_dir, or --resume auto to start over there "
                                 "(that run's records are dropped)"]
    proc = run(common(corpus[0], out, 2) + ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["loss"] for r in records] == pytest.approx([first[1]["loss"], first[2]["loss"]], rel=1e-6)
    assert records[0]["time"] > first[2]["time"]  # this run's, not the killed one's
