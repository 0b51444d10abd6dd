"""Reading and writing safetensors files with positioned reads and writes: no memory maps, no staging copies.

Owns: parsing and checking a file's header (an 8-byte little-endian length, then JSON naming each tensor's dtype,
shape and `data_offsets` relative to the end of the header), planning and issuing large `preadv` reads of byte ranges
into caller-owned buffers (ranges that touch, or nearly touch, in the file share one call), encoding a header, and the
write-side primitives of `hf_writer.ShardedWriter`: whole and vectored positioned writes, O_DIRECT descriptors and
page-aligned tensors for them, early write-back, fsync. Does not own checkpoint directories (`hf_reader.py`,
`hf_writer.py`).

Why not `safe_open`: it memory-maps the file, and a layer's experts are hundreds of separate tensors; copying each out
of the map takes one page fault per 4 KB (page-fault bound, well under the disk's bandwidth), and mapped pages count in
the process's RSS until the map is closed. `preadv` into the final buffer is one kernel copy per byte, sequential, and
leaves no file pages in RSS. Files written with these primitives follow the format exactly (header padded with spaces
to a multiple of 8 bytes, data offsets tiling the data section, every tensor aligned to its element size), so
safetensors, transformers and this reader load them as they load `safetensors.torch.save_file` output.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# safetensors dtype names (the format's spelling) and the torch dtypes they hold.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024
READ_CHUNK = 64 << 20  # bytes per preadv call: large enough to be sequential, small enough for readahead to run ahead
MAX_GAP = 1 << 20  # ranges at most this far apart are read by one call, the bytes between them thrown away
WRITE_CHUNK = 1 << 30  # bytes per write call (Linux moves at most ~2 GB per call)
DIRECT_ALIGN = 4096  # file offsets, lengths and memory addresses of O_DIRECT writes are multiples of this


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header, with absolute file offsets."""

    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """None for a dtype this module cannot read (callers fall back to safetensors)."""
        return DTYPES.get(self.dtype)


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int


def _pairs_no_duplicates(path: str):
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{path}: tensor {key} is listed twice in the header")
            out[key] = value
        return out
    return hook


def read_header(path: str) -> Header:
    """Parse and check a safetensors header: known fields, sizes that match shape x dtype, data ranges that tile the
    file's data section exactly (what safetensors itself checks before handing out a tensor). ValueError otherwise."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the header length field)")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"{path}: not a safetensors file or truncated (header length {length}, file {size} "
                             "bytes)")
        raw = f.read(length)
    try:
        parsed = json.loads(raw, object_pairs_hook=_pairs_no_duplicates(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + length
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"{path}: safetensors __metadata__ is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in parsed.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: malformed header entry for tensor {key}: {json.dumps(entry)[:200]}")
        torch_dtype = DTYPES.get(dtype)
        if torch_dtype is not None:
            expected = math.prod(shape) * torch_dtype.itemsize
            if end - begin != expected:
                raise ValueError(f"{path}: tensor {key} has {end - begin} bytes, but {dtype} {shape} needs "
                                 f"{expected}")
        tensors[key] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    position = data_start
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != position:
            raise ValueError(f"{path}: tensor {key} starts at byte {info.start - data_start} of the data, expected "
                             f"{position - data_start} (overlapping or gapped data offsets)")
        position = info.end
    if position != size:
        raise ValueError(f"{path}: the header describes {position - data_start} bytes of tensor data but the file "
                         f"holds {size - data_start} (truncated or trailing bytes)")
    return Header(path, tensors, metadata, data_start)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable, flat byte view of a contiguous CPU tensor's memory (no copy)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def preadv_full(fd: int, buffers: list[memoryview], offset: int, path: str = "") -> None:
    """Fill `buffers` in order from `offset`, looping over short reads; ValueError at end of file."""
    def at_eof(offset: int) -> None:
        raise ValueError(f"{path}: unexpected end of file at byte {offset} (truncated while reading?)")

    _vectored_all(os.preadv, fd, [b for b in buffers if len(b)], offset, at_eof)


def _vectored_all(syscall, fd: int, bufs: list[memoryview], offset: int, on_nothing=None) -> None:
    """Run a vectored syscall (os.preadv / os.pwritev) over `bufs` from `offset` until all are done, resuming after
    short transfers, at most IOV_MAX buffers a call; `on_nothing(offset)` is called when a call moves no byte."""
    i = 0
    while i < len(bufs):
        n = syscall(fd, bufs[i:i + IOV_MAX], offset)
        if n <= 0 and on_nothing is not None:
            on_nothing(offset)
        offset += n
        while i < len(bufs) and n >= len(bufs[i]):
            n -= len(bufs[i])
            i += 1
        if n:
            bufs[i] = bufs[i][n:]


def read_ranges(fd: int, ranges: Iterable[tuple[int, memoryview]], path: str = "", chunk: int = READ_CHUNK,
                max_gap: int = MAX_GAP) -> None:
    """Fill each buffer with the file's bytes starting at its offset. Ranges are sorted and cut into pieces of at most
    `chunk` bytes; neighbouring pieces (touching, or apart by at most `max_gap` bytes, read into a scratch buffer)
    share one `preadv` of at most about `chunk` bytes, so a layer's hundreds of tensors take a few large reads."""
    pieces = sorted(((offset + pos, buf[pos:pos + chunk]) for offset, buf in ranges
                     for pos in range(0, len(buf), chunk)), key=lambda p: p[0])
    scratch: memoryview | None = None
    group: list[memoryview] = []
    start = end = 0
    for offset, piece in pieces:
        gap = offset - end
        if group and 0 <= gap <= max_gap and end + gap + len(piece) - start <= chunk and len(group) < IOV_MAX - 1:
            if gap:
                scratch = scratch if scratch is not None else memoryview(bytearray(max_gap))
                group.append(scratch[:gap])
        else:
            if group:
                preadv_full(fd, group, start, path)
            group, start = [], offset
        group.append(piece)
        end = offset + len(piece)
    if group:
        preadv_full(fd, group, start, path)


def group_reads(ranges: Iterable[tuple[int, int, object]], chunk: int = READ_CHUNK,
                max_gap: int = MAX_GAP) -> list[tuple[int, int, list[tuple[int, int, object, int]]]]:
    """Plan reads of (file offset, nbytes, tag) ranges of one file: sorted, neighbours (at most `max_gap` apart)
    sharing one read of at most `chunk` bytes, a range larger than `chunk` cut into pieces. Returns (start, span,
    parts) per read, each part (offset in the read, nbytes, tag, offset in its range). A read starts where a range
    or piece starts, so ranges whose sizes are multiples of 4096 keep 4096-aligned offsets in the read's buffer."""
    reads: list[tuple[int, int, list[tuple[int, int, object, int]]]] = []
    start = end = 0
    parts: list[tuple[int, int, object, int]] = []
    for offset, nbytes, tag in sorted(ranges, key=lambda r: r[0]):
        for pos in range(0, max(nbytes, 1), chunk):
            n = min(chunk, nbytes - pos)
            here = offset + pos
            if not (parts and 0 <= here - end <= max_gap and here + n - start <= chunk):
                if parts:
                    reads.append((start, end - start, parts))
                start, end, parts = here, here, []
            parts.append((here - start, n, tag, pos))
            end = here + n
    if parts:
        reads.append((start, end - start, parts))
    return reads


def encode_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], int, int]],
                  metadata: dict[str, str] | None = None, reserve: int = 0) -> bytes:
    """The header, length field included, for (key, dtype, shape, begin, end) entries (data offsets, in file order),
    padded with spaces to a multiple of 8 bytes and to at least `reserve` bytes (the format allows the padding)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, dtype, shape, begin, end in entries:
        name = DTYPE_NAMES.get(dtype)
        if name is None:
            raise ValueError(f"tensor {key}: dtype {dtype} cannot be stored in safetensors")
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (max(reserve, len(raw) + (-len(raw) % 8)) - len(raw))
    return struct.pack("<Q", len(raw)) + raw


def write_all(fd: int, data: memoryview | bytes, offset: int | None = None) -> None:
    """Write all of `data` at `offset` (pwrite), or at the file position when None."""
    view = memoryview(data).cast("B")
    pos = 0
    while pos < len(view):
        part = view[pos:pos + WRITE_CHUNK]
        pos += os.write(fd, part) if offset is None else os.pwrite(fd, part, offset + pos)


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write the buffers one after the other from `offset` with vectored writes, looping over short writes."""
    _vectored_all(os.pwritev, fd, [memoryview(v).cast("B") for v in views if len(v)], offset)


def _sync_file_range():
    try:
        import ctypes  # noqa: PLC0415

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _sync_file_range() if os.name == "posix" else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to the disk now, without waiting (Linux `sync_file_range`), so
    the final fsync finds little left to do; a no-op elsewhere. Errors surface at the fsync."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def open_for_write(path: str) -> int:
    """A new, empty file, opened for reading too (a writer may move data it wrote)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)


def open_direct(path: str) -> int | None:
    """A second, O_DIRECT descriptor on an existing file, or None where the platform or filesystem has none (tmpfs,
    macOS). Direct writes go from memory to the disk without the page cache: on the machines we measured, buffered
    writes cost about a CPU-second per GB in the kernel and run at half the disk's speed."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def aligned_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, align: int = DIRECT_ALIGN) -> torch.Tensor:
    """torch.empty whose data starts at a multiple of `align` bytes (so direct writes can use it as is)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    start = -raw.data_ptr() % align
    return raw[start:start + nbytes].view(dtype).view(tuple(shape))


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (a directory's entries: creations and renames inside it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * os.path.isdir(path))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
