"""Reading Hugging Face safetensors checkpoint directories, one tensor or one layer's experts at a time.

Owns: finding the shards (index or single file), the key -> shard map, and lazily reading one layer's expert tensors
in any layout as the fused [E,2I,H] / [E,H,I] pair, optionally only a contiguous block of experts (expert parallelism),
or one expert at a time; header-only checks of a layer's expert tensors (presence, shapes, dtypes) and of the index
against the shards. Does not own the model or writing checkpoints (see `hf_writer.py`).

Reads go through `safetensors_io`: shard headers are parsed once, and a layer's expert tensors are read with a few
large sequential `preadv` calls straight into the preallocated fused buffers (the hub stores a layer's 3 x E expert
tensors next to each other, so they coalesce), never through a memory map: no page-fault-bound copies, no file pages
in RSS. `expert_matrices` + `stream` serve layout conversion: where each expert matrix lies, and a file-order read of
byte ranges through caller-provided (reused) buffers. A non-expert tensor of a dtype that module does not know is
read through safetensors' `safe_open`. `release()` closes the open files (and any such maps) between layers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from framework.checkpoint import hf_layout as hl
from framework.checkpoint import safetensors_io as sio

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROJS = ("gate_proj", "up_proj", "down_proj")
_SHARD_OF_RE = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def _no_duplicate_keys(path: str):
    """A json object_pairs_hook: json.load keeps the last of two equal keys silently, hiding a duplicated tensor."""
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{path}: tensor {key} is listed twice in the index")
            seen.add(key)
        return dict(pairs)
    return hook


@dataclass
class LayerExperts:
    """The checkpoint keys that hold one MoE layer's experts."""

    layout: str
    prefix: str
    per_expert: dict[tuple[int, str], str] = field(default_factory=dict)  # (expert, proj) -> key
    whole: dict[str, str] = field(default_factory=dict)  # proj -> key (fused / stacked)


class HFCheckpoint:
    """A read-only view of a safetensors checkpoint directory. Use as a context manager."""

    def __init__(self, path: str, key_map: Callable[[str], str] | None = None):
        """`key_map`: a family's stored name -> transformers 5 name (e.g. Mixtral's hub `block_sparse_moe.experts.0.w1
        .weight` -> `mlp.experts.0.gate_proj.weight`), or None for a tensor to leave unread (DeepSeek-V3's
        multi-token-prediction layers); every method here takes and returns the mapped names."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        self.path = path
        self._headers: dict[str, sio.Header] = {}
        self.key_to_file = self._key_map(path)
        self._stored: dict[str, str] = {}  # mapped name -> name in the file, where they differ
        if key_map is not None:
            self._rename(key_map)
        self.layout = hl.detect_layout(self.key_to_file)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}  # safe_open fallback, for dtypes safetensors_io does not read
        self._fds: dict[str, int] = {}
        self.layers = self._group_expert_keys()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def release(self) -> None:
        """Close every open shard (they reopen on the next read; parsed headers are kept)."""
        self.close()

    def check_shards(self) -> None:
        """Check that the shards hold exactly what the index says, both ways: no tensor missing from its shard, none
        in two shards, none in a shard but not in the index (a converter would drop it silently), no numbered shard
        the index leaves out, and no sharded checkpoint without its index. Reads shard headers only."""
        index = os.path.join(self.path, INDEX_NAME)
        if not os.path.exists(index):
            numbered = sorted(f for f in os.listdir(self.path) if _SHARD_OF_RE.search(f))
            if numbered:
                total = int(_SHARD_OF_RE.search(numbered[0])[2])
                raise FileNotFoundError(f"{self.path}: missing index {INDEX_NAME} ({len(numbered)} of {total} "
                                        "numbered shards present)")
            return  # a single file, or loose shards already scanned key by key in _key_map
        seen: dict[str, str] = {}
        for shard in sorted(set(self.key_to_file.values())):
            for key in self._header(shard).tensors:
                if key in seen:
                    raise ValueError(f"{self.path}: tensor {key} is in both {seen[key]} and {shard}")
                seen[key] = shard
        for name, shard in self.key_to_file.items():
            key = self._stored.get(name, name)  # the shards hold the stored names
            if seen.get(key) != shard:
                where = f"it is in {seen[key]}" if key in seen else "no shard holds it"
                raise ValueError(f"{self.path}: missing tensor {key} in shard {shard} named by the index ({where})")
        self._check_unlisted(seen)

    def _check_unlisted(self, seen: dict[str, str]) -> None:
        """The other direction of `check_shards`: every tensor of every shard is in the index."""
        listed = {self._stored.get(name, name) for name in self.key_to_file}
        for key in sorted(seen):
            if key not in listed:
                raise ValueError(f"{os.path.join(self.path, seen[key])}: tensor {key} is in the shard but not in "
                                 f"{INDEX_NAME}; add it to weight_map or re-create the index")
        named = set(seen.values())
        for shard in sorted(f for f in os.listdir(self.path) if _SHARD_OF_RE.search(f) and f not in named):
            keys = sorted(self._header(shard).tensors)
            if keys:
                raise ValueError(f"{os.path.join(self.path, shard)}: shard holds {len(keys)} tensor(s) "
                                 f"(e.g. {keys[0]}) that {INDEX_NAME} does not name; add them to weight_map or "
                                 "remove the shard")

    def _key_map(self, path: str) -> dict[str, str]:
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f, object_pairs_hook=_no_duplicate_keys(index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' object; re-create the index or remove it")
            missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(path, f))})
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
            return dict(weight_map)
        if os.path.exists(os.path.join(path, SINGLE_NAME)):
            shards = [SINGLE_NAME]
        else:
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            raise FileNotFoundError(f"{path}: no {INDEX_NAME} and no *.safetensors files")
        key_to_file: dict[str, str] = {}
        for shard in shards:
            for key in self._header(shard).tensors:
                if key in key_to_file:
                    raise ValueError(f"{path}: tensor {key} is in both {key_to_file[key]} and {shard}")
                key_to_file[key] = shard
        return key_to_file

    def _rename(self, key_map: Callable[[str], str | None]) -> None:
        renamed: dict[str, str] = {}
        for key, shard in self.key_to_file.items():
            name = key_map(key)
            if name is None:
                continue
            if name in renamed:
                raise ValueError(f"{self.path}: tensors {self._stored.get(name, name)} and {key} are both {name}")
            renamed[name] = shard
            if name != key:
                self._stored[name] = key
        self.key_to_file = renamed

    def _group_expert_keys(self) -> dict[int, LayerExperts]:
        layers: dict[int, LayerExperts] = {}
        stacked = self.layout == hl.STACKED
        for key in self.key_to_file:
            ek = hl.parse_expert_key(key, stacked_down=stacked)
            if ek is None:
                continue
            layer = layers.setdefault(ek.layer, LayerExperts(ek.layout, ek.prefix))
            if ek.expert is not None:
                other = layer.per_expert.get((ek.expert, ek.proj))
                if other is not None:  # e.g. "experts.3." and "experts.03."
                    raise ValueError(f"{self.path}: duplicate expert {ek.expert} of layer {ek.layer}: {other} and "
                                     f"{key}")
                layer.per_expert[(ek.expert, ek.proj)] = key
            else:
                layer.whole[ek.proj] = key
        return layers

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(
                safe_open(os.path.join(self.path, shard), framework="pt"))
        return self._handles[shard]

    def _header(self, shard: str) -> sio.Header:
        if shard not in self._headers:
            self._headers[shard] = sio.read_header(os.path.join(self.path, shard))
        return self._headers[shard]

    def _fd(self, shard: str) -> int:
        if shard not in self._fds:
            fd = os.open(os.path.join(self.path, shard), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            self._fds[shard] = fd
        return self._fds[shard]

    def info(self, key: str) -> sio.TensorInfo:
        """Where `key` lies in its shard (dtype, shape, byte range), from the shard's header."""
        shard = self.key_to_file.get(key)
        if shard is None:
            raise KeyError(f"{self.path}: tensor {key} not found")
        info = self._header(shard).tensors.get(self._stored.get(key, key))
        if info is None:
            raise ValueError(f"{self.path}: missing tensor {key} in shard {shard} named by the index")
        return info

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def stored_key(self, key: str) -> str:
        """The name `key` has in the files, before the family's key map."""
        return self._stored.get(key, key)

    def non_expert_keys(self) -> list[str]:
        stacked = self.layout == hl.STACKED
        return [k for k in self.key_to_file if hl.parse_expert_key(k, stacked_down=stacked) is None]

    def _read_into(self, plan: list[tuple[str, int, torch.Tensor]]) -> None:
        """Fill each destination (contiguous) with the bytes of `key` from byte `offset` of that tensor, all of one
        shard's ranges in one sorted, coalesced pass of large `preadv` calls."""
        by_shard: dict[str, list[tuple[int, memoryview]]] = defaultdict(list)
        for key, offset, dest in plan:
            info = self.info(key)
            view = sio.byte_view(dest)
            if offset < 0 or offset + len(view) > info.nbytes:
                raise ValueError(f"{self.path}: read of bytes {offset}..{offset + len(view)} of {key} past its "
                                 f"{info.nbytes} bytes")
            by_shard[self.key_to_file[key]].append((info.start + offset, view))
        for shard, ranges in by_shard.items():
            sio.read_ranges(self._fd(shard), ranges, os.path.join(self.path, shard))

    def get(self, key: str) -> torch.Tensor:
        info = self.info(key)
        if info.torch_dtype is None:
            return self._handle(self.key_to_file[key]).get_tensor(self._stored.get(key, key))
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        self._read_into([(key, 0, out)])
        return out

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the first dimension (clamped like a slice), reading only those bytes."""
        info = self.info(key)
        if info.torch_dtype is None or not info.shape:
            return self._handle(self.key_to_file[key]).get_slice(self._stored.get(key, key))[start:stop]
        start, stop, _ = slice(start, stop).indices(info.shape[0])
        stop = max(start, stop)
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.torch_dtype)
        self._read_into([(key, start * self._row_bytes(info), out)])
        return out

    @staticmethod
    def _row_bytes(info: sio.TensorInfo) -> int:
        return math.prod(info.shape[1:]) * info.torch_dtype.itemsize

    def shape(self, key: str) -> list[int]:
        return list(self.info(key).shape)

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "F32", ...), from the header."""
        return self.info(key).dtype

    def check_layer_experts(self, layer: int, num_experts: int, hidden: int, inter: int) -> str:
        """Check one layer's expert tensors against the config from the headers alone: every expert present once,
        shapes [I,H]/[I,H]/[H,I] (or the stacked / fused equivalents) and one dtype. Returns that dtype."""
        entry = self.layers.get(layer)
        if entry is None:
            raise ValueError(f"{self.path}: no expert tensors for MoE layer {layer} "
                             f"(expected e.g. model.layers.{layer}.mlp.experts.gate_up_proj)")
        if entry.layout == hl.PER_EXPERT:
            self._check_expert_indices(layer, entry, num_experts)
            expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
            keys = [(entry.per_expert[(e, proj)], expected[proj]) for e in range(num_experts) for proj in PROJS]
        elif entry.layout == hl.FUSED:
            gu_key, d_key = hl.fused_keys(entry.prefix)
            self._require(layer, [gu_key, d_key])
            self._check_expert_count(layer, gu_key, num_experts)
            keys = [(gu_key, (num_experts, 2 * inter, hidden)), (d_key, (num_experts, hidden, inter))]
        else:
            g_key, u_key, d_key = hl.stacked_keys(entry.prefix)
            self._require(layer, [g_key, u_key, d_key])
            self._check_expert_count(layer, g_key, num_experts)
            keys = [(g_key, (num_experts, inter, hidden)), (u_key, (num_experts, inter, hidden)),
                    (d_key, (num_experts, hidden, inter))]
        first_key, _ = keys[0]
        first_dtype = self.dtype(first_key)
        for key, shape in keys:  # named as stored: what the user finds in the files (Mixtral: ...experts.0.w1.weight)
            hl.check_shape(self.stored_key(key), torch.empty(self.shape(key), device="meta"), shape)
            hl.check_dtype(self.stored_key(key), self.dtype(key), first_dtype, self.stored_key(first_key))
        return first_dtype

    def _check_expert_count(self, layer: int, key: str, num_experts: int) -> None:
        shape = self.shape(key)
        if shape and shape[0] != num_experts:
            raise ValueError(f"{self.path}: layer {layer} has {shape[0]} experts ({key} {shape}) but the config says "
                             f"num_experts={num_experts}")

    def _check_expert_indices(self, layer: int, entry: LayerExperts, num_experts: int) -> None:
        present = {proj: {e for (e, p) in entry.per_expert if p == proj} for proj in PROJS}
        found = set().union(*present.values())
        # The same contiguous 0..K-1 everywhere with K != num_experts is a config that disagrees (or whole experts
        # missing at the end); holes or uneven projections are missing tensors.
        uniform = found and all(present[p] == set(range(max(found) + 1)) for p in PROJS)
        if uniform and max(found) + 1 != num_experts:
            raise ValueError(f"{self.path}: layer {layer} has experts 0..{max(found)} ({max(found) + 1}) but the "
                             f"config says num_experts={num_experts} (config.json disagrees with the tensors, or "
                             f"expert(s) {max(found) + 1}.. are missing)")
        for proj in PROJS:
            extra = sorted(e for e in present[proj] if e >= num_experts)
            if extra:
                raise ValueError(f"{self.path}: layer {layer} has {proj} for expert {extra[0]} but the config says "
                                 f"num_experts={num_experts}")
            missing = sorted(set(range(num_experts)) - present[proj])
            if missing:
                key = hl.per_expert_key(entry.prefix, missing[0], proj)
                raise ValueError(f"{self.path}: missing expert {missing[0]} of layer {layer} ({key})")

    def read_layer_experts(self, layer: int, num_experts: int, hidden: int, inter: int,
                           expert_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's experts [lo, hi) as fused gate_up [e,2I,H] and down [e,H,I], whatever the stored layout.

        Reads every stored tensor straight into its place in the two preallocated outputs (gate and up of an expert
        are next to each other in both the hub's files and gate_up), with a few large sequential reads per shard, so
        the peak is one layer's experts.
        """
        lo, hi = expert_range or (0, num_experts)
        dtype = self.layer_dtype(layer, num_experts, hidden, inter)
        gate_up = torch.empty((max(hi - lo, 0), 2 * inter, hidden), dtype=dtype)
        down = torch.empty((max(hi - lo, 0), hidden, inter), dtype=dtype)
        self.read_layer_experts_into(layer, num_experts, hidden, inter, gate_up, down, expert_range)
        return gate_up, down

    def layer_dtype(self, layer: int, num_experts: int, hidden: int, inter: int) -> torch.dtype:
        """The torch dtype of a layer's experts, after `check_layer_experts`."""
        name = self.check_layer_experts(layer, num_experts, hidden, inter)
        if name not in sio.DTYPES:
            raise ValueError(f"{self.path}: layer {layer} experts have dtype {name}, which torch cannot hold")
        return sio.DTYPES[name]

    def read_layer_experts_into(self, layer: int, num_experts: int, hidden: int, inter: int, gate_up: torch.Tensor,
                                down: torch.Tensor, expert_range: tuple[int, int] | None = None) -> None:
        """`read_layer_experts` into given contiguous gate_up [e,2I,H] and down [e,H,I] (e.g. reused buffers, or the
        model's own parameters)."""
        lo, hi = expert_range or (0, num_experts)
        if not 0 <= lo <= hi <= num_experts:
            raise ValueError(f"{self.path}: expert range {lo}..{hi} of layer {layer} is outside its {num_experts} "
                             "experts")
        dtype = self.layer_dtype(layer, num_experts, hidden, inter)
        for name, out, shape in (("gate_up", gate_up, (hi - lo, 2 * inter, hidden)),
                                 ("down", down, (hi - lo, hidden, inter))):
            if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
                raise ValueError(f"{name} buffer: expected contiguous CPU {dtype} {list(shape)}, got {out.dtype} "
                                 f"{list(out.shape)}")
        self._read_into(self._expert_plan(self.layers[layer], lo, hi, inter, hidden, gate_up, down))

    def read_expert(self, layer: int, expert: int, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """One expert's gate [I,H], up [I,H] and down [H,I] as separate tensors (own storage each), whatever the
        stored layout, reading only that expert's bytes. Call `check_layer_experts` first."""
        entry = self.layers[layer]
        if entry.layout == hl.PER_EXPERT:
            return tuple(self.get(entry.per_expert[(expert, proj)]) for proj in PROJS)
        key = hl.fused_keys(entry.prefix)[0] if entry.layout == hl.FUSED else hl.stacked_keys(entry.prefix)[0]
        dtype = self.info(key).torch_dtype
        if dtype is None:
            raise ValueError(f"{self.path}: {key} has dtype {self.info(key).dtype}, which torch cannot hold")
        out = tuple(torch.empty(s, dtype=dtype) for s in ((inter, hidden), (inter, hidden), (hidden, inter)))
        matrices = self._matrices(entry, expert, expert + 1, inter * hidden * dtype.itemsize)
        self._read_into([(key, offset, dest) for (_, _, key, offset, _), dest in zip(matrices, out)])
        return out

    def expert_matrices(self, layer: int, num_experts: int, hidden: int, inter: int,
                        expert_range: tuple[int, int] | None = None) -> list[tuple[int, str, str, int, int]]:
        """Where each expert's gate [I,H], up [I,H] and down [H,I] matrix is stored, whatever the layout: (expert,
        proj, key, byte offset in that stored tensor, nbytes), for experts [lo, hi). Converting layouts is moving
        these byte ranges; see `stream`. Checks the layer first."""
        lo, hi = expert_range or (0, num_experts)
        dtype = self.layer_dtype(layer, num_experts, hidden, inter)
        return self._matrices(self.layers[layer], lo, hi, inter * hidden * dtype.itemsize)

    @staticmethod
    def _matrices(entry: LayerExperts, lo: int, hi: int, matrix: int) -> list[tuple[int, str, str, int, int]]:
        out = []
        for e in range(lo, hi):
            if entry.layout == hl.FUSED:  # gate_up[e] is gate_e then up_e
                gu_key, d_key = hl.fused_keys(entry.prefix)
                where = [(gu_key, 2 * e * matrix), (gu_key, (2 * e + 1) * matrix), (d_key, e * matrix)]
            elif entry.layout == hl.STACKED:
                where = [(key, e * matrix) for key in hl.stacked_keys(entry.prefix)]
            else:
                where = [(entry.per_expert[(e, proj)], 0) for proj in PROJS]
            out += [(e, proj, key, offset, matrix) for proj, (key, offset) in zip(PROJS, where)]
        return out

    def stream(self, ranges: list[tuple[str, int, int, object]], buffers,
               emit: Callable[[object, int, torch.Tensor], None], chunk: int = sio.READ_CHUNK) -> None:
        """Read (key, byte offset in that tensor, nbytes, tag) ranges in file order, shard by shard, with reads of up
        to `chunk` bytes into buffers from `buffers.get()` (contiguous uint8 tensors of at least `chunk` bytes, e.g.
        a ring of reused ones); after each read, `emit(tag, offset in the range, bytes)` for every part of a range
        it holds, then `buffers.done(buffer)`. Nothing is allocated per byte read."""
        by_shard: dict[str, list[tuple[int, int, object]]] = defaultdict(list)
        for key, offset, nbytes, tag in ranges:
            info = self.info(key)
            if offset < 0 or offset + nbytes > info.nbytes:
                raise ValueError(f"{self.path}: read of bytes {offset}..{offset + nbytes} of {key} past its "
                                 f"{info.nbytes} bytes")
            by_shard[self.key_to_file[key]].append((info.start + offset, nbytes, tag))
        for shard in sorted(by_shard):
            path, fd = os.path.join(self.path, shard), self._fd(shard)
            for start, span, parts in sio.group_reads(by_shard[shard], chunk):
                buffer = buffers.get()
                sio.preadv_full(fd, [sio.byte_view(buffer)[:span]], start, path)
                for rel, n, tag, pos in parts:
                    emit(tag, pos, buffer[rel:rel + n])
                buffers.done(buffer)

    def _expert_plan(self, entry: LayerExperts, lo: int, hi: int, inter: int, hidden: int, gate_up: torch.Tensor,
                     down: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
        """(key, byte offset in that tensor, destination) for experts [lo, hi) into gate_up [e,2I,H] / down [e,H,I],
        one item per expert and stored matrix (neighbours in the file are read by one call anyway)."""
        plan: list[tuple[str, int, torch.Tensor]] = []
        for e, proj, key, offset, _ in self._matrices(entry, lo, hi, inter * hidden * gate_up.element_size()):
            i = e - lo
            dest = {"gate_proj": gate_up[i, :inter], "up_proj": gate_up[i, inter:], "down_proj": down[i]}[proj]
            plan.append((key, offset, dest))
        return plan

    def _require(self, layer: int, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self.key_to_file]
        if missing:
            raise ValueError(f"{self.path}: MoE layer {layer} is missing {', '.join(missing)}")
