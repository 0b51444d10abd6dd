"""Reading Hugging Face safetensors checkpoint directories, one tensor or one layer's experts at a time.

Owns: finding the shards (index or single file), the key -> shard map, and lazily reading one layer's expert tensors
in any layout as the fused [E,2I,H] / [E,H,I] pair, optionally only a contiguous block of experts (expert parallelism),
or one expert at a time; header-only checks of a layer's expert tensors (presence, shapes, dtypes) and of the index
against the shards. Does not own the model or writing checkpoints (see `hf_writer.py`).

Shards are memory-mapped by safetensors; pages read through a map count in the process's RSS until it is closed, so
long streaming jobs call `release()` between layers to keep RSS bounded.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from framework.checkpoint import hf_layout as hl

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

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        self.path = path
        self.key_to_file = self._key_map(path)
        self.layout = hl.detect_layout(self.key_to_file)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.layers = self._group_expert_keys()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def release(self) -> None:
        """Unmap every open shard (they reopen on the next read); see the module docstring for why."""
        self.close()

    def check_shards(self) -> None:
        """Check that the shards hold exactly what the index says: no tensor missing from its shard, none in two
        shards, and no sharded checkpoint without its index. Reads shard headers only."""
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
            with safe_open(os.path.join(self.path, shard), framework="pt") as f:
                keys = set(f.keys())
            for key in keys:
                if key in seen:
                    raise ValueError(f"{self.path}: tensor {key} is in both {seen[key]} and {shard}")
                seen[key] = shard
        for key, shard in self.key_to_file.items():
            if seen.get(key) != shard:
                where = f"it is in {seen[key]}" if key in seen else "no shard holds it"
                raise ValueError(f"{self.path}: missing tensor {key} in shard {shard} named by the index ({where})")

    @staticmethod
    def _key_map(path: str) -> dict[str, str]:
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
            with safe_open(os.path.join(path, shard), framework="pt") as f:
                for key in f.keys():
                    if key in key_to_file:
                        raise ValueError(f"{path}: tensor {key} is in both {key_to_file[key]} and {shard}")
                    key_to_file[key] = shard
        return key_to_file

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

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def non_expert_keys(self) -> list[str]:
        stacked = self.layout == hl.STACKED
        return [k for k in self.key_to_file if hl.parse_expert_key(k, stacked_down=stacked) is None]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise KeyError(f"{self.path}: tensor {key} not found")
        return self._handle(self.key_to_file[key]).get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the first dimension, reading only those bytes."""
        return self._handle(self.key_to_file[key]).get_slice(key)[start:stop]

    def shape(self, key: str) -> list[int]:
        return list(self._handle(self.key_to_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "F32", ...), from the header."""
        return self._handle(self.key_to_file[key]).get_slice(key).get_dtype()

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
        for key, shape in keys:
            hl.check_shape(key, torch.empty(self.shape(key), device="meta"), shape)
            hl.check_dtype(key, self.dtype(key), first_dtype, first_key)
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

        Fills preallocated outputs one stored tensor at a time, so the peak is one layer's experts plus one tensor.
        """
        lo, hi = expert_range or (0, num_experts)
        self.check_layer_experts(layer, num_experts, hidden, inter)
        entry = self.layers[layer]
        if entry.layout == hl.FUSED:
            gu_key, d_key = hl.fused_keys(entry.prefix)
            return self.get_rows(gu_key, lo, hi), self.get_rows(d_key, lo, hi)
        if entry.layout == hl.STACKED:
            g_key, u_key, d_key = hl.stacked_keys(entry.prefix)
            down = self.get_rows(d_key, lo, hi)
            gate_up = torch.empty((hi - lo, 2 * inter, hidden), dtype=down.dtype)
            gate_up[:, :inter] = self.get_rows(g_key, lo, hi)
            gate_up[:, inter:] = self.get_rows(u_key, lo, hi)
            return gate_up, down
        gate_up = down = None
        for i, e in enumerate(range(lo, hi)):
            g, u, d = (self.get(entry.per_expert[(e, proj)]) for proj in PROJS)
            if gate_up is None:
                gate_up = torch.empty((hi - lo, 2 * inter, hidden), dtype=g.dtype)
                down = torch.empty((hi - lo, hidden, inter), dtype=d.dtype)
            gate_up[i, :inter], gate_up[i, inter:], down[i] = g, u, d
        if gate_up is None:
            raise ValueError(f"{self.path}: empty expert range {lo}..{hi} for layer {layer}")
        return gate_up, down

    def read_expert(self, layer: int, expert: int, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """One expert's gate [I,H], up [I,H] and down [H,I] as separate tensors (own storage each), whatever the
        stored layout, reading only that expert's bytes. Call `check_layer_experts` first."""
        entry = self.layers[layer]
        if entry.layout == hl.PER_EXPERT:
            return tuple(self.get(entry.per_expert[(expert, proj)]) for proj in PROJS)
        if entry.layout == hl.FUSED:
            gu_key, d_key = hl.fused_keys(entry.prefix)
            gu = self._handle(self.key_to_file[gu_key]).get_slice(gu_key)
            gate, up = gu[expert:expert + 1, :inter][0], gu[expert:expert + 1, inter:][0]
            return gate, up, self.get_rows(d_key, expert, expert + 1)[0]
        return tuple(self.get_rows(key, expert, expert + 1)[0] for key in hl.stacked_keys(entry.prefix))

    def _require(self, layer: int, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self.key_to_file]
        if missing:
            raise ValueError(f"{self.path}: MoE layer {layer} is missing {', '.join(missing)}")
