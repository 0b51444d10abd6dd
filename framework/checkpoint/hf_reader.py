"""Reading Hugging Face safetensors checkpoint directories, one tensor or one layer's experts at a time.

Owns: finding the shards (index or single file), the key -> shard map, and lazily reading one layer's expert tensors
in any layout as the fused [E,2I,H] / [E,H,I] pair, optionally only a contiguous block of experts (expert parallelism).
Does not own the model or writing checkpoints.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from framework.checkpoint import hf_layout as hl

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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

    @staticmethod
    def _key_map(path: str) -> dict[str, str]:
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
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

    def read_layer_experts(self, layer: int, num_experts: int, hidden: int, inter: int,
                           expert_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's experts [lo, hi) as fused gate_up [e,2I,H] and down [e,H,I], whatever the stored layout."""
        lo, hi = expert_range or (0, num_experts)
        entry = self.layers.get(layer)
        if entry is None:
            raise ValueError(f"{self.path}: no expert tensors for MoE layer {layer} "
                             f"(expected e.g. model.layers.{layer}.mlp.experts.gate_up_proj)")
        if entry.layout == hl.PER_EXPERT:
            return self._read_per_expert(layer, entry, num_experts, hidden, inter, lo, hi)
        if entry.layout == hl.FUSED:
            gu_key, d_key = hl.fused_keys(entry.prefix)
            self._require(layer, [gu_key, d_key])
            hl.check_shape(gu_key, torch.empty(self.shape(gu_key), device="meta"), (num_experts, 2 * inter, hidden))
            hl.check_shape(d_key, torch.empty(self.shape(d_key), device="meta"), (num_experts, hidden, inter))
            return self.get_rows(gu_key, lo, hi), self.get_rows(d_key, lo, hi)
        g_key, u_key, d_key = hl.stacked_keys(entry.prefix)
        self._require(layer, [g_key, u_key, d_key])
        for key, shape in ((g_key, (num_experts, inter, hidden)), (u_key, (num_experts, inter, hidden)),
                           (d_key, (num_experts, hidden, inter))):
            hl.check_shape(key, torch.empty(self.shape(key), device="meta"), shape)
        return hl.stacked_to_fused(entry.prefix, self.get_rows(g_key, lo, hi), self.get_rows(u_key, lo, hi),
                                   self.get_rows(d_key, lo, hi), hi - lo, hidden, inter)

    def _require(self, layer: int, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self.key_to_file]
        if missing:
            raise ValueError(f"{self.path}: MoE layer {layer} is missing {', '.join(missing)}")

    def _read_per_expert(self, layer: int, entry: LayerExperts, num_experts: int, hidden: int, inter: int,
                         lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        present = defaultdict(set)
        for (e, proj) in entry.per_expert:
            present[proj].add(e)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            extra = sorted(e for e in present[proj] if e >= num_experts)
            if extra:
                raise ValueError(f"{self.path}: layer {layer} has {proj} for expert {extra[0]} but the config says "
                                 f"num_experts={num_experts}")
            missing = sorted(set(range(num_experts)) - present[proj])
            if missing:
                key = hl.per_expert_key(entry.prefix, missing[0], proj)
                raise ValueError(f"{self.path}: missing expert {missing[0]} of layer {layer} ({key})")
        tensors = {proj: [self.get(entry.per_expert[(e, proj)]) for e in range(lo, hi)]
                   for proj in ("gate_proj", "up_proj", "down_proj")}
        gate_up, down = hl.per_expert_to_fused(entry.prefix, tensors["gate_proj"], tensors["up_proj"],
                                               tensors["down_proj"], hidden, inter, first_expert=lo)
        return gate_up, down
