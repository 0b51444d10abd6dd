"""Writing Hugging Face safetensors checkpoint directories in a stream of tensors, and copying the files around them.

Owns: `ShardedWriter` (tensors in, `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` bytes plus
`model.safetensors.index.json` out; a shard is written by a background thread while the next one fills, so reading
and writing overlap and at most two shards are held in memory) and `copy_non_weight_files` (config, tokenizer,
generation config, licence, ...: everything in a checkpoint directory except weights).

Format marker: the index's `metadata` carries `expert_layout` ("fused" = transformers 5 `gate_up_proj` / `down_proj`,
"per_expert" = the hub's `experts.{e}.{gate,up,down}_proj.weight`), next to the usual `total_size` (sum of tensor
bytes) and `total_parameters`. Loaders ignore unknown metadata keys; our tools and `HFCheckpoint` read the layout from
the tensor names anyway, the marker is for people and scripts.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
# Weight files of any framework: never copied next to converted weights, where they would be stale duplicates.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx")


def parse_size(size: int | str) -> int:
    """Bytes from 5GB / 500MB / 2GiB / an int, the way `save_pretrained(max_shard_size=...)` reads it."""
    from transformers.utils.hub import convert_file_size_to_int  # lazy: importing transformers costs ~0.5 s

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        raise ValueError(f"max shard size {size!r}: expected a size such as 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise ValueError(f"max shard size {size!r} must be positive")
    return value


class ShardedWriter:
    """Collects tensors in order and writes them as shards of at most `max_shard_size` bytes (a single larger tensor
    gets a shard of its own). Tensors are held until their shard is written: pass tensors that own their storage.

    save_file releases the GIL, so one background thread writes a full shard while the caller reads the next tensors;
    `flush` waits for the previous write first, which bounds memory at two shards. Call `close` (or `abort`)."""

    def __init__(self, directory: str, max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None):
        self.directory = directory
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata or {})
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # keys of each written shard, in order
        self.total_size = 0
        self.total_parameters = 0
        self._seen: set[str] = set()
        self.closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._in_flight: Future | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError("ShardedWriter.add after close")
        if key in self._seen:
            raise ValueError(f"tensor {key} written twice")
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self.flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_size += nbytes
        self.total_parameters += tensor.numel()

    def flush(self) -> None:
        """Start writing the pending tensors as the next shard (after the previous write has finished)."""
        if not self._pending:
            return
        self._wait()
        # Final names need the shard count, known only at close(): write under a provisional name, rename then.
        path = os.path.join(self.directory, self._provisional(len(self._shards)))
        self._in_flight = self._pool.submit(save_file, self._pending, path, {"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # re-raises a failed write (disk full, ...) here, in the caller's thread

    def abort(self) -> None:
        """Stop without writing the index (the caller removes the directory)."""
        self.closed = True
        self._pending = {}
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the caller is already handling the error that made it abort
            pass
        self._pool.shutdown(wait=True)

    def close(self) -> dict:
        """Write the last shard, give every shard its final name and write the index; returns the index."""
        self.flush()
        self.closed = True
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.rename(os.path.join(self.directory, self._provisional(i)), os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_size, "total_parameters": self.total_parameters,
                              **self.metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return index

    @staticmethod
    def _provisional(i: int) -> str:
        return f"shard-{i + 1:05d}.safetensors.partial"


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)


def copy_non_weight_files(src: str, dst: str) -> list[str]:
    """Copy everything in `src` except weight files and hidden entries (e.g. huggingface_hub's `.cache/` download
    state, which describes the source's files, not ours) into `dst`; returns the relative paths copied."""
    copied: list[str] = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, src)
        for name in sorted(files):
            if name.startswith(".") or is_weight_file(name):
                continue
            rel = os.path.normpath(os.path.join(rel_root, name))
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(dst, rel))
            copied.append(rel)
    return copied
