"""framework/checkpoint/integrity.py and run_lock.py on hand-made checkpoint directories (no training): what
verifies, what `--resume` resolves to, and the run lock across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from framework.checkpoint.integrity import (MANIFEST_NAME, SAMPLE_BYTES, file_digest, resolve_resume,
                                            verify_checkpoint, write_manifest)
from framework.train.errors import CheckpointError
from framework.train.run_lock import LOCK_NAME, acquire_run_lock


def make_tag(root, step: int, manifest: bool = True, big: int = 3 * SAMPLE_BYTES) -> str:
    tag_dir = os.path.join(root, f"step_{step:08d}")
    os.makedirs(os.path.join(tag_dir, "tokenizer"))
    with open(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
        f.write(bytes(range(256)) * (big // 256) + bytes([step]))
    with open(os.path.join(tag_dir, "tokenizer", "tokenizer.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(tag_dir, "meta.json"), "w") as f:
        json.dump({"files": {"optim": ["zero_pp_rank_0_mp_rank_00_optim_states.pt"], "model": [], "experts": []}}, f)
    if manifest:
        write_manifest(tag_dir)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{step:08d}")
    return tag_dir


def test_manifest_records_every_file_and_verification_finds_damage(tmp_path):
    tag_dir = make_tag(str(tmp_path), 2)
    with open(os.path.join(tag_dir, MANIFEST_NAME)) as f:
        files = json.load(f)["files"]
    assert sorted(files) == ["meta.json", "tokenizer/tokenizer.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    big = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert files["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["size"] == 3 * SAMPLE_BYTES + 1 == os.path.getsize(big)
    assert verify_checkpoint(tag_dir) is None

    with open(big, "r+b") as f:  # same size, last byte changed: only the checksum of the tail can tell
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    expected = files["zero_pp_rank_0_mp_rank_00_optim_states.pt"]["crc32"]
    assert verify_checkpoint(tag_dir) == (f"{big} has checksum {file_digest(big)['crc32']:08x}, expected "
                                          f"{expected:08x}")
    os.truncate(big, 1000)
    assert verify_checkpoint(tag_dir) == f"{big} has 1000 bytes, expected {3 * SAMPLE_BYTES + 1}"
    os.remove(os.path.join(tag_dir, "tokenizer", "tokenizer.json"))
    assert verify_checkpoint(tag_dir) == f"{os.path.join(tag_dir, 'tokenizer', 'tokenizer.json')} is missing"


def test_without_manifest_only_presence_is_checked(tmp_path):
    tag_dir = make_tag(str(tmp_path), 2, manifest=False)
    big = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    os.truncate(big, 10)
    assert verify_checkpoint(tag_dir) is None  # sizes were never recorded
    os.remove(big)
    assert verify_checkpoint(tag_dir) == f"{big} is missing"
    os.remove(os.path.join(tag_dir, "meta.json"))
    assert verify_checkpoint(tag_dir) == f"{os.path.join(tag_dir, 'meta.json')} is missing (the save did not finish)"


def test_resolve_resume(tmp_path):
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    assert resolve_resume(out, None) is None and resolve_resume(out, "auto") is None  # nothing yet: fresh start
    os.makedirs(os.path.join(root, ".tmp-step_00000002"))  # a first save killed before its rename
    assert resolve_resume(out, "auto") is None
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "w") as f:
        f.write('{"step": 1}\n')
    with pytest.raises(CheckpointError, match=f"holds another run's {metrics} \\(and no checkpoint\\); choose"):
        resolve_resume(out, None)
    assert resolve_resume(out, "auto") is None
    make_tag(root, 2)
    make_tag(root, 4)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(step_00000004 in .*--resume auto, or "
                                              "choose another train.output_dir"):
        resolve_resume(out, None)
    point = resolve_resume(out, "auto")
    assert (point.root, point.tag, point.warning) == (root, "step_00000004", None)

    make_tag(root, 6)  # a step directory newer than `latest` (pointer never moved): `latest` decides
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000004")
    assert resolve_resume(out, "auto").tag == "step_00000004"

    newest = os.path.join(root, "step_00000004", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    os.truncate(newest, 5)
    point = resolve_resume(out, "auto")
    assert point.tag == "step_00000002"
    assert point.warning == (f"warning: the latest checkpoint is damaged: {newest} has 5 bytes, expected "
                             f"{3 * SAMPLE_BYTES + 1}; resuming from {os.path.join(root, 'step_00000002')} instead")
    with pytest.raises(CheckpointError, match=f"train.resume: checkpoint {root}/step_00000004 is damaged: {newest} "
                                              "has 5 bytes"):
        resolve_resume(out, os.path.join(root, "step_00000004"))
    assert resolve_resume(out, os.path.join(root, "step_00000006")).tag == "step_00000006"  # explicit: allowed
    assert resolve_resume(out, root).tag == "step_00000002"  # a checkpoint root: as auto

    os.remove(os.path.join(root, "step_00000002", "meta.json"))
    with pytest.raises(CheckpointError, match="damaged: .* no older checkpoint in .* is complete either"):
        resolve_resume(out, "auto")
    os.remove(os.path.join(root, "latest"))
    with pytest.raises(CheckpointError, match=r"holds step_00000002, step_00000004, step_00000006 but no `latest` "
                                              f"file.*--resume {root}/step_00000006$"):
        resolve_resume(out, "auto")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_resume(out, str(tmp_path / "nowhere"))


def test_run_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    out = str(tmp_path / "run")
    lock = acquire_run_lock(out)
    assert acquire_run_lock(out) is lock  # the same process asking again
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert f.read() == f"host {socket.gethostname()} pid {os.getpid()}\n"
    code = ("import sys; from framework.train.run_lock import acquire_run_lock\n"
            "try:\n    acquire_run_lock(sys.argv[1])\nexcept FileExistsError as e:\n    print(e); sys.exit(2)")
    other = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, cwd=os.getcwd())
    assert other.returncode == 2
    assert other.stdout == (f"train.output_dir {out} is in use by another run (host {socket.gethostname()} pid "
                            f"{os.getpid()}, lock {out}/{LOCK_NAME}); wait for it to end, or choose another "
                            "train.output_dir\n")
    lock.release()
    assert subprocess.run([sys.executable, "-c", code, out], cwd=os.getcwd()).returncode == 0
    # a holder killed with SIGKILL leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c", code + "\nimport time; print('held', flush=True); "
                               "time.sleep(60)", out], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(FileExistsError, match=f"pid {holder.pid},"):
        acquire_run_lock(out)
    holder.kill()
    holder.wait()
    acquire_run_lock(out).release()
