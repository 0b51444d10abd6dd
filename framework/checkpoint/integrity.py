"""Whether a checkpoint on disk is whole, and which one a run resumes from: pure filesystem work, no process group,
so it can run before DeepSpeed starts.

Owns: the per-tag `manifest.json` (size and checksum of every file, written by rank 0 once every rank's files are
written and before the tag directory gets its final name), `verify_checkpoint`, and `resolve_resume`, the rules for
`--resume`:
- none: a fresh run; refused if OUTPUT_DIR/checkpoints already holds checkpoints (another run's: resume it or choose
  another directory), or OUTPUT_DIR/metrics.jsonl has records, so two runs never share a checkpoint directory or a
  metrics file.
- "auto": the checkpoint `latest` names; none yet: from scratch (and metrics.jsonl restarts at step 1). If it is damaged, the newest older checkpoint that verifies, with one warning
  line; none verifies: an error. No `latest` but step directories: an error naming them (see `_latest`).
- a tag directory: that checkpoint, which must verify. A checkpoint root (holding `latest`): as "auto" there.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass

from framework.checkpoint.atomic_dir import write_text_atomic
from framework.train.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
META_NAME = "meta.json"  # framework/checkpoint/zero_reader.py: written last by the engine save
DATA_STATE_NAME = "data_state.json"  # the run's data position (framework/data/samples.py), in every checkpoint
TAG_RE = re.compile(r"^step_(\d{8})$")
SAMPLE_BYTES = 1 << 20
MANIFEST_VERSION = 1


def file_digest(path: str) -> dict[str, int]:
    """Size and CRC-32 of the first and last MiB (and the size). Not the whole file: checkpoints are tens of GB per
    rank on shared filesystems and resume must not read them twice; the damage seen in practice (a copy or write cut
    short, a file emptied or swapped for another step's) changes the size or one of the ends."""
    size = os.path.getsize(path)
    crc = zlib.crc32(str(size).encode())
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return {"size": size, "crc32": crc}


def _files_under(tag_dir: str) -> list[str]:
    out = []
    for current, _, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(current, name), tag_dir)
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def write_manifest(tag_dir: str) -> int:
    """Record every file of `tag_dir` (rank 0, after every rank's files are written); returns their total bytes."""
    files = {rel: file_digest(os.path.join(tag_dir, rel)) for rel in _files_under(tag_dir)}
    write_text_atomic(os.path.join(tag_dir, MANIFEST_NAME),
                      json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1, sort_keys=True) + "\n")
    return sum(d["size"] for d in files.values())


def checkpoint_bytes(tag_dir: str) -> int:
    """Total size of a checkpoint's files."""
    return sum(os.path.getsize(os.path.join(tag_dir, rel)) for rel in _files_under(tag_dir))


def verify_checkpoint(tag_dir: str) -> str | None:
    """None if the checkpoint is whole, else what is wrong (one phrase naming the file, expected vs found). With a
    manifest: every file it lists is present with its size and checksum. Checkpoints from before manifests: only
    that meta.json and the rank files it lists are present (their sizes were never recorded)."""
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} does not exist"
    manifest_path = os.path.join(tag_dir, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        return _verify_presence(tag_dir)
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for rel, expected in sorted(files.items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{path} has {size} bytes, expected {expected['size']}"
        found = file_digest(path)["crc32"]
        if found != expected["crc32"]:
            return f"{path} has checksum {found:08x}, expected {expected['crc32']:08x}"
    return None


def _verify_presence(tag_dir: str) -> str | None:
    meta_path = os.path.join(tag_dir, META_NAME)
    try:
        with open(meta_path) as f:
            listed = json.load(f)["files"]
    except FileNotFoundError:
        return f"{meta_path} is missing (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{meta_path} is unreadable ({exc})"
    names = [n for kind in ("optim", "model", "experts") for n in listed.get(kind) or []]
    for name in names:
        if not os.path.isfile(os.path.join(tag_dir, name)):
            return f"{os.path.join(tag_dir, name)} is missing"
    return None


@dataclass(frozen=True)
class ResumePoint:
    root: str  # the checkpoint root (OUTPUT_DIR/checkpoints, or the parent of a tag directory given)
    tag: str
    warning: str | None = None  # set when a damaged newer checkpoint was passed over: print it once

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)


def step_tags(root: str) -> list[str]:
    """step_N directories under `root`, oldest first (complete or not: only verification tells)."""
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isdir(os.path.join(root, t)))


def read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _latest(root: str) -> str | None:
    """The tag `latest` names: the single source of truth, since a save renames its directory first and moves
    `latest` last, so a newer step directory than `latest` may be a save whose pointer never moved. No `latest` while
    step directories exist is an error rather than a guess: it happens only if the very first save was killed in the
    instant between its rename and the pointer write, or if `latest` was removed by hand; both are rare enough that
    naming the directory to resume from explicitly costs less than resuming something nobody chose."""
    named = read_latest(root)
    tags = step_tags(root)
    if named is None and tags:
        raise CheckpointError(f"{root} holds {', '.join(tags)} but no `latest` file, so which one is current is "
                              f"unknown; resume one explicitly with --resume {os.path.join(root, tags[-1])}")
    return named


def _resolve_in_root(root: str) -> ResumePoint | None:
    named = _latest(root)
    if named is None:
        return None
    damage = verify_checkpoint(os.path.join(root, named))
    if damage is None:
        return ResumePoint(root, named)
    older = [t for t in step_tags(root) if TAG_RE.match(named) and t < named]
    for tag in reversed(older):
        if verify_checkpoint(os.path.join(root, tag)) is None:
            return ResumePoint(root, tag, f"warning: the latest checkpoint is damaged: {damage}; resuming from "
                                          f"{os.path.join(root, tag)} instead")
    raise CheckpointError(f"the latest checkpoint is damaged: {damage}; no older checkpoint in {root} is complete "
                          "either, so there is nothing to resume; start a fresh run in another train.output_dir")


def resolve_resume(output_dir: str, resume: str | None) -> ResumePoint | None:
    """Where a run starts (see the module docstring). None: from scratch. Raises CheckpointError (an unusable
    checkpoint or a fresh run into a directory with checkpoints) or FileNotFoundError (no such --resume path), each
    one line."""
    root = os.path.join(os.path.abspath(output_dir), "checkpoints")
    if resume is None:
        tags = step_tags(root)
        if tags or read_latest(root) is not None:
            raise CheckpointError(
                f"train.output_dir {output_dir} already holds checkpoints ({tags[-1] if tags else 'latest'} in "
                f"{root}) from another run; continue it with --resume auto, or choose another train.output_dir")
        metrics = os.path.join(os.path.abspath(output_dir), "metrics.jsonl")
        if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:  # a run that never saved: its log is all it left
            raise CheckpointError(
                f"train.output_dir {output_dir} already holds another run's {metrics} (and no checkpoint); choose "
                "another train.output_dir, or --resume auto to start over there (that run's records are dropped)")
        return None
    if resume == "auto":
        return _resolve_in_root(root)
    path = os.path.abspath(resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"train.resume: {resume} is not a directory; give a checkpoint (…/step_N) or 'auto'")
    is_tag = (TAG_RE.match(os.path.basename(path)) or os.path.exists(os.path.join(path, META_NAME))
              or os.path.exists(os.path.join(path, MANIFEST_NAME)))
    if is_tag:
        damage = verify_checkpoint(path)
        if damage is not None:
            raise CheckpointError(f"train.resume: checkpoint {path} is damaged: {damage}; resume from another "
                                  "checkpoint (--resume auto picks the newest whole one)")
        return ResumePoint(os.path.dirname(path), os.path.basename(path))
    found = _resolve_in_root(path)
    if found is None:
        raise FileNotFoundError(f"train.resume: {resume} holds no checkpoint (no step_N directory or `latest` file)")
    return found
