"""Writing Hugging Face safetensors checkpoint directories in a stream of tensors, and copying the files around them.

Owns: `ShardedWriter` (tensors in, `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` bytes plus
`model.safetensors.index.json` out) and `copy_non_weight_files` (config, tokenizer, generation config, licence, ...:
everything in a checkpoint directory except weights).

Streaming: a tensor is not held until its shard is complete. `add` hands it to a background thread that writes it at
its final place in the shard file straight from the tensor's memory, and `begin` returns a `TensorSink` that takes a
large tensor in parts, in any order (merge writes each expert's rows while the rest of the layer is still being
read). The shard's header, known only when the shard is complete, goes into space reserved at the start of the file
(the format allows padding the header with spaces); should it outgrow the reserve, the data is moved up once. Tensors
under `STREAM_MIN_BYTES`, or whose size is not a multiple of 4096, wait and go at the end of their shard, ordered as
safetensors orders them, so every tensor stays aligned to its element size. At most `queue_bytes` (default: one shard,
at most 1 GiB) wait for the writer thread; `add` blocks beyond that, which bounds memory.

Streamed data starts at a multiple of 4096 bytes in the file and is written with O_DIRECT (`safetensors_io.
open_direct`), from the tensor's memory when it is 4096-aligned (`safetensors_io.aligned_empty`), else through a small
aligned bounce buffer; where direct I/O is refused, plain writes are used. The header and the small tensors are plain
writes.

Durability (`fsync=True`, the default): a second thread fsyncs each completed shard while the next one is written
(direct writes are on the disk already; plain ones are pushed early with `sync_file_range`), and `close` fsyncs the
index and the directory: a checkpoint that `close` returned is on disk.

Format marker: the index's `metadata` carries `expert_layout` ("fused" = transformers 5 `gate_up_proj` / `down_proj`,
"per_expert" = the hub's `experts.{e}.{gate,up,down}_proj.weight`), next to the usual `total_size` (sum of tensor
bytes) and `total_parameters`. Loaders ignore unknown metadata keys; our tools and `HFCheckpoint` read the layout from
the tensor names anyway, the marker is for people and scripts.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import mmap
import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from framework.checkpoint import safetensors_io as sio

INDEX_NAME = "model.safetensors.index.json"
# Weight files of any framework: never copied next to converted weights, where they would be stale duplicates.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx")
STREAM_MIN_BYTES = 1 << 20  # smaller tensors wait for the end of their shard (see the module docstring)
_ALIGN = sio.DIRECT_ALIGN  # streamed tensors start (and so end) at multiples of this in the file
_SHIFT_CHUNK = 64 << 20
_BOUNCE_BYTES = 16 << 20
_RUN_BYTES = 64 << 20


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


class _Worker:
    """One background thread running jobs in order. `submit` blocks while more than `limit` bytes of jobs wait, and
    re-raises, in the caller's thread, the first error a job raised; after an error the remaining jobs are skipped."""

    def __init__(self, name: str, limit: int):
        self.limit = limit
        self.error: BaseException | None = None
        self._jobs: collections.deque = collections.deque()
        self._queued = 0
        self._busy = False
        self._cancelled = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int = 0, always: bool = False) -> None:
        """Queue `job`; one with `always` runs even after an error or `cancel` (and never raises here)."""
        with self._cond:
            while self._queued and self._queued + nbytes > self.limit and self.error is None:
                self._cond.wait()
            if self.error is not None and not always:
                raise self.error
            self._jobs.append((job, nbytes, always))
            self._queued += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes, always = self._jobs.popleft()
                self._busy = True
                skip = (self.error is not None or self._cancelled) and not always
            try:
                if not skip:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by submit / drain
                with self._cond:
                    self.error = self.error or exc
            finally:
                job = None  # drop the job's tensors before waiting for the next one
                with self._cond:
                    self._queued -= nbytes
                    self._busy = False
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has run; re-raise the first error."""
        with self._cond:
            while self._jobs or self._busy:
                self._cond.wait()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self._cancelled = True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()


@dataclass
class _Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = -1  # in the data section; -1 until placed
    tensor: torch.Tensor | None = None  # held only by tensors that wait for the end of the shard
    owned: bool = False  # `tensor` is the writer's own memory (a copy, or a sink's buffer)


@dataclass
class _Shard:
    index: int
    path: str
    nbytes: int = 0
    streamed: list[_Entry] = field(default_factory=list)
    waiting: list[_Entry] = field(default_factory=list)
    data_end: int = 0  # bytes of streamed data placed so far
    fd: int | None = None
    direct_fd: int | None = None  # O_DIRECT descriptor for the streamed data, where the filesystem allows it
    reserve: int = 0  # header bytes reserved after the 8-byte length, once streaming started
    open_sinks: int = 0
    sealed: bool = False
    finishing: bool = False  # its last step is queued: the writer thread owns its fields now

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.streamed] + [e.key for e in self.waiting]


class TensorSink:
    """One tensor of a `ShardedWriter`, written in parts: `write(byte_offset, part)` for each contiguous part (its
    bytes, whatever its dtype; any order, each byte once), then `close()`. Parts are written from their own memory: do
    not modify them until `ShardedWriter.written()` says so."""

    def __init__(self, writer: "ShardedWriter", shard: _Shard, entry: _Entry):
        self._writer, self._shard, self._entry = writer, shard, entry
        self._written = 0
        self.closed = False

    def write(self, byte_offset: int, part: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError(f"TensorSink({self._entry.key}).write after close")
        part = part.contiguous()
        if part.device.type != "cpu":
            raise ValueError(f"tensor {self._entry.key}: parts must be CPU tensors, got {part.device.type}")
        nbytes = part.numel() * part.element_size()
        if byte_offset < 0 or byte_offset + nbytes > self._entry.nbytes:
            raise ValueError(f"tensor {self._entry.key}: part at bytes {byte_offset}..{byte_offset + nbytes} outside "
                             f"its {self._entry.nbytes} bytes")
        self._written += nbytes
        if self._entry.tensor is not None:  # a waiting tensor: assemble it here
            sio.byte_view(self._entry.tensor)[byte_offset:byte_offset + nbytes] = sio.byte_view(part)
        else:
            self._writer._submit_write(self._shard, self._entry.offset + byte_offset, part)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._written != self._entry.nbytes:
            raise ValueError(f"tensor {self._entry.key}: {self._written} of its {self._entry.nbytes} bytes written")
        self._writer._sink_closed(self._shard)


class ShardedWriter:
    """Collects tensors in order and writes them as shards of at most `max_shard_size` bytes (a single larger tensor
    gets a shard of its own), streaming them to disk as they come (see the module docstring). Tensors are not copied:
    do not modify a tensor after `add` (views of a larger buffer are fine; the buffer lives until they are written).
    Call `close` (or `abort`)."""

    def __init__(self, directory: str, max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None,
                 fsync: bool = True, queue_bytes: int | None = None):
        self.directory = directory
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata or {})
        self.fsync = fsync
        self.total_size = 0
        self.total_parameters = 0
        self.closed = False
        self._seen: set[str] = set()
        self._shards: list[_Shard] = []
        self._current: _Shard | None = None
        self._writer = _Worker("shard-writer", queue_bytes or min(self.max_shard_size, 1 << 30))
        self._syncer = _Worker("shard-fsync", 1 << 62)
        self._bounce: memoryview | None = None  # page-aligned, used by the writer thread only
        self._run: list | None = None  # [shard, file position, nbytes, tensors]: writes being gathered

    # ---- input ----

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = (tensor if tensor.device.type == "cpu" else tensor.cpu()).contiguous()
        shard, entry = self._new_entry(key, tensor.dtype, tuple(tensor.shape))
        if entry.offset < 0:
            entry.tensor = tensor
        else:
            self._submit_write(shard, entry.offset, tensor)

    def begin(self, key: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> TensorSink:
        """Start a tensor that arrives in parts (see `TensorSink`); it takes its place in the shards now."""
        shard, entry = self._new_entry(key, dtype, tuple(shape))
        if entry.offset < 0:
            entry.tensor, entry.owned = torch.empty(entry.shape, dtype=dtype), True
        shard.open_sinks += 1
        return TensorSink(self, shard, entry)

    def written(self) -> threading.Event:
        """An event set once everything added or written to a sink so far has been written (or the writer failed;
        the error surfaces at the next call): the caller may then reuse those tensors' memory. Small tensors that wait
        for the end of their shard are copied now, so they no longer use the caller's memory."""
        for shard in self._shards:
            if not shard.finishing:
                for entry in shard.waiting:
                    if not entry.owned:
                        entry.tensor, entry.owned = entry.tensor.clone(), True
        event = threading.Event()
        if self.closed:
            event.set()
        else:
            self._flush_run()
            self._writer.submit(event.set, always=True)
        return event

    def flush(self) -> None:
        """End the current shard: the next tensor starts a new one."""
        if self._current is not None:
            self._seal(self._current)
            self._current = None

    def _new_entry(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[_Shard, _Entry]:
        if self.closed:
            raise RuntimeError("ShardedWriter.add after close")
        if key in self._seen:
            raise ValueError(f"tensor {key} written twice")
        if dtype not in sio.DTYPE_NAMES:
            raise ValueError(f"tensor {key}: dtype {dtype} cannot be stored in safetensors")
        if self._writer.error is not None:
            raise self._writer.error
        self._seen.add(key)
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        shard = self._current
        if shard is None or (shard.nbytes and shard.nbytes + nbytes > self.max_shard_size):
            self.flush()
            shard = self._current = _Shard(len(self._shards), os.path.join(self.directory,
                                                                           self._provisional(len(self._shards))))
            self._shards.append(shard)
        shard.nbytes += nbytes
        self.total_size += nbytes
        self.total_parameters += numel
        entry = _Entry(key, dtype, shape, nbytes)
        if nbytes >= STREAM_MIN_BYTES and nbytes % _ALIGN == 0:
            if shard.fd is None:
                shard.reserve = self._header_reserve(shard, entry)
                shard.fd = sio.open_for_write(shard.path)
                shard.direct_fd = sio.open_direct(shard.path)
            entry.offset = shard.data_end
            shard.data_end += nbytes
            shard.streamed.append(entry)
        else:
            shard.waiting.append(entry)
        return shard, entry

    def _header_reserve(self, shard: _Shard, first: _Entry) -> int:
        """Header bytes to reserve when a shard starts streaming: twice what a shard full of tensors like this one
        (plus those already waiting) would need, at least max_shard_size / 1024 up to 1 MiB (a 5 GB shard of small
        tensors), at most 16 MiB. A header that outgrows it costs one move of the shard's data, nothing else."""
        per_entry = len(json.dumps({first.key: {"dtype": "BF16", "shape": list(first.shape),
                                                "data_offsets": [10 ** 12, 10 ** 12]}})) + 8
        room = max(self.max_shard_size - shard.nbytes, 0)
        estimate = 256 + per_entry * (len(shard.waiting) + 1 + room // max(first.nbytes, 1))
        floor = max(4096, min(1 << 20, self.max_shard_size // 1024))
        reserve = min(max(2 * estimate, floor), 16 << 20)
        return reserve + (-(8 + reserve) % _ALIGN)  # the data starts at a multiple of _ALIGN

    def _submit_write(self, shard: _Shard, data_offset: int, tensor: torch.Tensor) -> None:
        """Queue a write of `tensor`'s bytes at `data_offset` of the shard's data. Writes that continue the previous
        one in the file are gathered into one vectored write of up to _RUN_BYTES (fewer, larger direct writes)."""
        position = 8 + shard.reserve + data_offset
        nbytes = tensor.numel() * tensor.element_size()
        run = self._run
        if run is not None and (run[0] is not shard or run[1] + run[2] != position or run[2] + nbytes > _RUN_BYTES
                                or len(run[3]) >= 64):
            self._flush_run()
            run = None
        if run is None:
            self._run = [shard, position, nbytes, [tensor]]
        else:
            run[2] += nbytes
            run[3].append(tensor)

    def _flush_run(self) -> None:
        if self._run is not None:
            shard, position, nbytes, tensors = self._run
            self._run = None
            self._writer.submit(lambda: self._pwrite(shard, position, tensors), nbytes)

    def _pwrite(self, shard: _Shard, position: int, tensors: list[torch.Tensor]) -> None:
        views = [sio.byte_view(t) for t in tensors]
        nbytes = sum(len(v) for v in views)
        if shard.direct_fd is not None and position % _ALIGN == 0 and all(len(v) % _ALIGN == 0 for v in views):
            try:
                if all(t.data_ptr() % _ALIGN == 0 for t in tensors):
                    sio.pwritev_all(shard.direct_fd, views, position)
                    return
                at = position
                for tensor, view in zip(tensors, views):  # unaligned memory goes through the bounce buffer
                    if tensor.data_ptr() % _ALIGN == 0:
                        sio.pwritev_all(shard.direct_fd, [view], at)
                    else:
                        bounce = self._bounce_buffer()
                        for pos in range(0, len(view), len(bounce)):
                            n = min(len(bounce), len(view) - pos)
                            bounce[:n] = view[pos:pos + n]
                            sio.write_all(shard.direct_fd, bounce[:n], at + pos)
                    at += len(view)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(shard.direct_fd)  # direct I/O refused after all: plain writes for this shard
                shard.direct_fd = None
        sio.pwritev_all(shard.fd, views, position)
        if self.fsync:
            sio.start_writeback(shard.fd, position, nbytes)

    def _bounce_buffer(self) -> memoryview:
        if self._bounce is None:
            self._bounce = memoryview(mmap.mmap(-1, _BOUNCE_BYTES))  # anonymous maps are page-aligned
        return self._bounce

    def _sink_closed(self, shard: _Shard) -> None:
        shard.open_sinks -= 1
        if shard.sealed and shard.open_sinks == 0:
            self._finish(shard)

    def _seal(self, shard: _Shard) -> None:
        if not shard.sealed:
            shard.sealed = True
            if shard.open_sinks == 0:
                self._finish(shard)

    def _finish(self, shard: _Shard) -> None:
        """Queue the shard's last step after its streamed writes: the waiting tensors, the header, the fsync."""
        shard.finishing = True
        self._flush_run()
        self._writer.submit(lambda: self._write_tail(shard), sum(e.nbytes for e in shard.waiting))

    # ---- in the writer thread ----

    def _write_tail(self, shard: _Shard) -> None:
        waiting = sorted(shard.waiting, key=lambda e: (-e.dtype.itemsize, e.key))
        offset = shard.data_end
        for entry in waiting:
            entry.offset, offset = offset, offset + entry.nbytes
        entries = [(e.key, e.dtype, e.shape, e.offset, e.offset + e.nbytes) for e in shard.streamed + waiting]
        meta = {"format": "pt"}
        header = sio.encode_header(entries, meta)
        if shard.fd is None:  # nothing streamed: the header takes exactly its size
            shard.fd = sio.open_for_write(shard.path)
            shard.reserve = len(header) - 8
        elif len(header) - 8 > shard.reserve:
            grown = len(header) - 8
            self._move_data(shard.fd, 8 + shard.reserve, shard.data_end, grown - shard.reserve)
            shard.reserve = grown
        sio.write_all(shard.fd, sio.encode_header(entries, meta, shard.reserve), 0)
        for entry in waiting:
            sio.write_all(shard.fd, sio.byte_view(entry.tensor), 8 + shard.reserve + entry.offset)
            entry.tensor = None
        shard.waiting = waiting
        if shard.direct_fd is not None:
            os.close(shard.direct_fd)
            shard.direct_fd = None
        fd = shard.fd
        if self.fsync:
            self._syncer.submit(lambda: self._sync_close(shard, fd))
        else:
            os.close(fd)
            shard.fd = None

    @staticmethod
    def _move_data(fd: int, start: int, length: int, delta: int) -> None:
        """Move bytes [start, start+length) of the file up by `delta`, from the end down (regions may overlap)."""
        end = start + length
        while end > start:
            n = min(_SHIFT_CHUNK, end - start)
            data = os.pread(fd, n, end - n)
            if len(data) != n:
                raise OSError(f"short read while moving shard data ({len(data)} of {n} bytes)")
            sio.write_all(fd, data, end - n + delta)
            end -= n

    @staticmethod
    def _sync_close(shard: _Shard, fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            shard.fd = None

    # ---- end ----

    def _stop(self) -> None:
        for worker in (self._writer, self._syncer):
            worker.stop()
        for shard in self._shards:  # shards never finished (an abort): their descriptors are still open
            for attr in ("fd", "direct_fd"):
                if getattr(shard, attr) is not None:
                    os.close(getattr(shard, attr))
                    setattr(shard, attr, None)

    def abort(self) -> None:
        """Stop without writing the index (the caller removes the directory)."""
        self.closed = True
        self._run = None
        self._writer.cancel()
        for worker in (self._writer, self._syncer):
            try:
                worker.drain()
            except BaseException:  # noqa: BLE001 - the caller is already handling the error that made it abort
                pass
        self._stop()

    def close(self) -> dict:
        """Write the last shard, give every shard its final name and write the index; returns the index."""
        try:
            self.flush()
            self._flush_run()
            unfinished = [s for s in self._shards if s.open_sinks]
            if unfinished:
                raise RuntimeError(f"ShardedWriter.close with a tensor still open in shard {unfinished[0].index + 1}")
            self.closed = True
            self._writer.drain()
            self._syncer.drain()
        finally:
            self.closed = True
            self._stop()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for shard in self._shards:
            name = f"model-{shard.index + 1:05d}-of-{count:05d}.safetensors"
            os.rename(shard.path, os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(shard.keys, name))
        index = {"metadata": {"total_size": self.total_size, "total_parameters": self.total_parameters,
                              **self.metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        if self.fsync:
            sio.fsync_path(self.directory)  # the renames and the index's directory entry
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
