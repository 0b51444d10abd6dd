"""Converting an MoE checkpoint directory (any family of framework/models/registry.py) from one expert layout to
another, streaming layer by layer.

Owns: the checks made before anything is written (config vs tensors, every expert present once, shapes, dtypes, no
unknown layout), the conversion loop, and `verify_conversion` (re-read the output, compare with the input tensor by
tensor, byte for byte).

The loop goes layer by layer: the layer's output tensors take their places in the output (`ShardedWriter.begin`), then
the input bytes they are made of (a layout change only rearranges each expert's gate / up / down matrices) are read in
file order with large sequential reads into a small ring of reused, page-aligned buffers, and written from there to
their final place in the output, while the next reads go on. Memory stays near the ring (256 MB) plus one output
shard's small tensors, whatever the checkpoint or layer size; no per-byte allocation, no copy in user space.
Input: any of per_expert / fused / stacked (see `hf_layout.py`); output: fused (`tools/moe_merge.py`) or per_expert
(`tools/moe_split.py`). Every non-expert tensor and every non-weight file passes through unchanged. Names: the input is
read under our (transformers 5) names through the family's `checkpoint_key`; fused output keeps them (stock
`from_pretrained` reads them as they are), per_expert output is written in the family's hub spelling (`hub_key`,
e.g. Mixtral's `block_sparse_moe.experts.{e}.w1`), the only per-expert names stock transformers reads.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from framework.checkpoint import hf_layout as hl
from framework.checkpoint import safetensors_io as sio
from framework.checkpoint.atomic_dir import atomic_output_dir, check_output_path
from framework.checkpoint.expert_geometry import ExpertGeometry, read_expert_geometry
from framework.checkpoint.hf_reader import PROJS, HFCheckpoint
from framework.checkpoint.hf_writer import ShardedWriter, TensorSink, copy_non_weight_files

TARGETS = (hl.FUSED, hl.PER_EXPERT)
# Input is read in file order, READ_BYTES at a time, into RING_BUFFERS reused buffers; the writer writes from them
# while the next ones are read. Memory for the weights is therefore RING_BUFFERS x READ_BYTES plus the small tensors
# waiting for the end of their output shard, whatever the checkpoint or layer size.
READ_BYTES = 32 << 20
RING_BUFFERS = 8
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class ConversionReport:
    input_layout: str | None
    output_layout: str
    num_tensors: int
    num_shards: int
    total_size: int  # bytes of tensor data written
    seconds: float
    copied_files: list[str] = field(default_factory=list)
    verified: bool = False


def check_experts(ckpt: HFCheckpoint, cfg: ExpertGeometry) -> None:
    """Every check that can fail before a byte is written, from config.json and the shard headers alone."""
    unknown = hl.unknown_expert_keys(ckpt.keys())
    if unknown:
        raise ValueError(f"{ckpt.path}: unknown expert layout: {unknown[0]} is neither per_expert "
                         "(experts.{e}.{gate,up,down}_proj.weight), fused (experts.gate_up_proj / experts.down_proj) "
                         "nor stacked (experts.gate_proj / up_proj / down_proj)")
    found, expected = set(ckpt.layers), set(cfg.moe_layers)
    if not found and expected:
        raise ValueError(f"{ckpt.path}: no expert tensors in a known layout (per_expert / fused / stacked), but "
                         f"{cfg.source} makes {len(expected)} layer(s) MoE, e.g. layer {min(expected)}")
    for layer in sorted(found - expected):
        raise ValueError(f"{ckpt.path}: layer {layer} has expert tensors but {cfg.source} makes it a dense layer "
                         f"(num_hidden_layers={cfg.num_hidden_layers} and the {cfg.family.model_type} dense-layer "
                         "fields)")
    for layer in sorted(expected - found):
        raise ValueError(f"{ckpt.path}: {cfg.source} makes layer {layer} an MoE layer but the checkpoint has no "
                         "expert tensors for it")
    for layer in cfg.moe_layers:
        ckpt.check_layer_experts(layer, cfg.num_experts, cfg.hidden_size, cfg.expert_width)


def _write_order(ckpt: HFCheckpoint) -> list[tuple[str, int | None]]:
    """(non-expert key, None) and (experts, layer) items grouped by layer, so each layer is read and written once."""
    by_layer: dict[int, list[str]] = defaultdict(list)
    head, tail = [], []
    for key in ckpt.non_expert_keys():
        m = _LAYER_RE.search(key)
        if m:
            by_layer[int(m[1])].append(key)
        else:
            (head if "embed" in key else tail).append(key)
    order: list[tuple[str, int | None]] = [(k, None) for k in sorted(head)]
    for layer in sorted(set(by_layer) | set(ckpt.layers)):
        order += [(k, None) for k in sorted(by_layer[layer])]
        if layer in ckpt.layers:
            order.append(("", layer))
    return order + [(k, None) for k in sorted(tail)]


class _Ring:
    """A few reused page-aligned read buffers of `size` bytes, handed out in turn; a buffer is handed out again only
    once the writer has written everything queued before it was last returned (`ShardedWriter.written`). Reused memory
    costs nothing per byte; fresh memory costs a page fault (and, in a VM, often a host fault) per 4 KB, about as long
    as reading it from the disk. Aligned memory goes to the disk with direct I/O as it is."""

    def __init__(self, writer: ShardedWriter, count: int, size: int):
        self.writer = writer
        self.free = collections.deque((sio.aligned_empty((size,), torch.uint8), None) for _ in range(count))

    def get(self) -> torch.Tensor:
        buffer, fence = self.free.popleft()
        if fence is not None:
            fence.wait()
        return buffer

    def done(self, buffer: torch.Tensor) -> None:
        self.free.append((buffer, self.writer.written()))


def _convert_group(ckpt: HFCheckpoint, writer: ShardedWriter, ring: _Ring, keys: list[str], layer: int | None,
                   cfg: ExpertGeometry, target: str) -> None:
    """One layer (or the tensors before / after the layers): its output tensors take their places in the output in
    order, then the input bytes they are made of are read in file order and handed to them as they arrive."""
    name = cfg.written_name(target)
    ranges: list[tuple[str, int, int, tuple[TensorSink, int]]] = []
    sinks: list[TensorSink] = []
    for key in keys:
        info = ckpt.info(key)
        if info.torch_dtype is None:  # a dtype only safetensors reads (the writer refuses what it cannot store)
            writer.add(name(key), ckpt.get(key))
            continue
        sinks.append(writer.begin(name(key), info.shape, info.torch_dtype))
        ranges.append((key, 0, info.nbytes, (sinks[-1], 0)))
    if layer is not None:
        num_experts, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.expert_width
        matrices = ckpt.expert_matrices(layer, num_experts, hidden, inter)
        dtype = ckpt.layer_dtype(layer, num_experts, hidden, inter)
        prefix = ckpt.layers[layer].prefix
        matrix = inter * hidden * dtype.itemsize
        if target == hl.FUSED:  # gate_up[e] = gate_e then up_e; down[e] = down_e
            gate_up = writer.begin(hl.fused_keys(prefix)[0], (num_experts, 2 * inter, hidden), dtype)
            down = writer.begin(hl.fused_keys(prefix)[1], (num_experts, hidden, inter), dtype)
            sinks += [gate_up, down]
            where = {"gate_proj": (gate_up, 0), "up_proj": (gate_up, matrix), "down_proj": (down, 0)}
            ranges += [(key, offset, n, (where[proj][0], (2 if proj != "down_proj" else 1) * e * matrix
                                         + where[proj][1])) for e, proj, key, offset, n in matrices]
        else:
            shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
            out = {}
            for e, proj, *_ in matrices:  # the hub's order: expert by expert, gate, up, down
                out[(e, proj)] = writer.begin(name(hl.per_expert_key(prefix, e, proj)), shapes[proj], dtype)
                sinks.append(out[(e, proj)])
            ranges += [(key, offset, n, (out[(e, proj)], 0)) for e, proj, key, offset, n in matrices]

    def emit(tag: tuple[TensorSink, int], pos: int, data: torch.Tensor) -> None:
        sink, base = tag
        sink.write(base + pos, data)

    ckpt.stream(ranges, ring, emit, chunk=READ_BYTES)
    for sink in sinks:
        sink.close()


def _groups(ckpt: HFCheckpoint) -> list[tuple[list[str], int | None]]:
    """(non-expert keys, MoE layer or None) per layer, plus the tensors before and after the layers, in the order
    they are written: embeddings, then layer by layer (its other tensors, then its experts), then the rest."""
    groups: list[tuple[list[str], int | None]] = []
    keys: list[str] = []
    for key, layer in _write_order(ckpt):
        if layer is None:
            keys.append(key)
            continue
        groups.append((keys, layer))
        keys = []
    return groups + [(keys, None)] if keys else groups


def convert_checkpoint(src: str, dst: str, target: str, max_shard_size: int | str = "5GB", overwrite: bool = False,
                       verify: bool = False, log: Callable[[str], None] | None = None) -> ConversionReport:
    """Write `src` with its experts in layout `target` (fused / per_expert) to a new directory `dst`.

    `dst` appears only when everything (and `verify`, if asked) succeeded; it is replaced only with `overwrite`.
    Raises ValueError / OSError with one-line messages for bad input.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target layout {target!r}; expected one of {', '.join(TARGETS)}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"input checkpoint directory not found: {src}")
    check_output_path(dst, overwrite, (src,))  # fail before reading anything
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    cfg = read_expert_geometry(src)
    with HFCheckpoint(src, cfg.checkpoint_key) as ckpt:
        ckpt.check_shards()
        check_experts(ckpt, cfg)
        with atomic_output_dir(dst, overwrite, (src,)) as tmp:
            copied = copy_non_weight_files(src, tmp)
            writer = ShardedWriter(tmp, max_shard_size, {"expert_layout": target})
            try:
                ring = _Ring(writer, RING_BUFFERS, READ_BYTES)
                for keys, layer in _groups(ckpt):
                    _convert_group(ckpt, writer, ring, keys, layer, cfg, target)
                    ckpt.release()
                    if layer is not None:
                        log(f"layer {layer}: experts converted ({layer + 1}/{cfg.num_hidden_layers})")
                index = writer.close()
            except BaseException:
                writer.abort()  # the background write must stop before atomic_output_dir removes the directory
                raise
            report = ConversionReport(ckpt.layout, target, len(index["weight_map"]),
                                      len(set(index["weight_map"].values())), writer.total_size, 0.0, copied)
            if verify:
                ckpt.release()
                verify_conversion(src, tmp, target, cfg, log)
                report.verified = True
    report.seconds = time.perf_counter() - start
    return report


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _check_same(key: str, expected: torch.Tensor, found: torch.Tensor) -> None:
    if expected.dtype != found.dtype or expected.shape != found.shape:
        raise ValueError(f"verify failed: {key}: output has {found.dtype} {list(found.shape)}, input "
                         f"{expected.dtype} {list(expected.shape)}")
    if not torch.equal(_as_bytes(expected), _as_bytes(found)):
        raise ValueError(f"verify failed: {key}: output bytes differ from the input")


def verify_conversion(src: str, out: str, target: str, cfg: ExpertGeometry | None = None,
                      log: Callable[[str], None] | None = None) -> None:
    """Re-read `out` and check it against `src`: the expected tensor names (the family's hub spelling for per_expert)
    and nothing else, the target layout, and
    every tensor equal byte for byte (experts compared layer by layer in the fused form). ValueError on a mismatch."""
    cfg = cfg or read_expert_geometry(src)
    log = log or (lambda _msg: None)
    hidden, inter, num_experts = cfg.hidden_size, cfg.expert_width, cfg.num_experts
    with HFCheckpoint(src, cfg.checkpoint_key) as a, HFCheckpoint(out, cfg.checkpoint_key) as b:
        b.check_shards()
        if b.layout not in (target, None):
            raise ValueError(f"verify failed: {out} has expert layout {b.layout}, expected {target}")
        expected = set(a.non_expert_keys())
        for layer in cfg.moe_layers:
            prefix = a.layers[layer].prefix
            expected |= set(hl.fused_keys(prefix)) if target == hl.FUSED else {
                hl.per_expert_key(prefix, e, proj) for e in range(num_experts) for proj in PROJS}
        # compared as written: per_expert output must carry the family's hub names, the ones stock transformers reads
        name = cfg.written_name(target)
        expected_names, written = {name(k) for k in expected}, {b.stored_key(k) for k in b.keys()}
        missing, unexpected = sorted(expected_names - written), sorted(written - expected_names)
        if missing or unexpected:
            raise ValueError(f"verify failed: {out}: " + (f"missing tensor {missing[0]}" if missing else
                                                          f"unexpected tensor {unexpected[0]}"))
        for key in a.non_expert_keys():
            x = a.get(key)
            _check_same(key, x, b.get(key))
            if x.numel() * x.element_size() >= 64 << 20:  # embeddings / lm_head: unmap, as between layers
                a.release()
                b.release()
        for layer in cfg.moe_layers:
            for name, x, y in zip(("gate_up_proj", "down_proj"),
                                  a.read_layer_experts(layer, num_experts, hidden, inter),
                                  b.read_layer_experts(layer, num_experts, hidden, inter)):
                _check_same(f"layer {layer} experts ({name}, fused form)", x, y)
            a.release()
            b.release()
        log(f"verified: {len(expected)} output tensors match the input byte for byte")
