"""Mixtral's hub checkpoint names <-> transformers 5's (transformers' conversion_mapping.py "mixtral" entry): the MoE
module is `block_sparse_moe`, experts are per-expert `w1` (gate), `w3` (up), `w2` (down). The per-expert layout
reader (framework/checkpoint/hf_reader.py) then fuses them as for Qwen3-MoE."""

from __future__ import annotations

import re

_EXPERT_RE = re.compile(r"(\.experts\.\d+\.)(w1|w3|w2)(\.weight)$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def mixtral_checkpoint_key(key: str) -> str:
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return _EXPERT_RE.sub(lambda m: f"{m[1]}{_PROJ[m[2]]}{m[3]}", key)


_PER_EXPERT_RE = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(\.weight)$")
_HUB_PROJ = {v: k for k, v in _PROJ.items()}


def mixtral_hub_key(key: str) -> str:
    """The inverse, for export: transformers 5 loads Mixtral's per-expert tensors only under the hub's names."""
    key = key.replace(".mlp.", ".block_sparse_moe.")
    return _PER_EXPERT_RE.sub(lambda m: f"{m[1]}{_HUB_PROJ[m[2]]}{m[3]}", key)
