"""Expert-weight layouts of MoE checkpoints under transformers 5 names (a family's hub spelling is mapped to these
first, see expert_geometry.py) and the conversions between them.

Owns: recognising which of the three on-disk layouts a key belongs to, and turning one layer's expert tensors from any
layout into the canonical fused one (and back). Does not own file I/O (see `hf_reader.py`) or the model.

Layouts (E experts, I = one expert's FFN width, H = hidden_size):
- "per_expert": the Hugging Face hub format, `model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`,
  [I, H], [I, H], [H, I] per expert.
- "fused": transformers 5 in-memory format and ours, `model.layers.{L}.mlp.experts.gate_up_proj` [E, 2I, H]
  (rows 0..I-1 gate, I..2I-1 up) and `model.layers.{L}.mlp.experts.down_proj` [E, H, I].
- "stacked": the older merged format, `model.layers.{L}.mlp.experts.{gate,up,down}_proj` (no `.weight` suffix),
  [E, I, H], [E, I, H], [E, H, I].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PER_EXPERT = "per_expert"
FUSED = "fused"
STACKED = "stacked"
LAYOUTS = (PER_EXPERT, FUSED, STACKED)

_PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<expert>\d+)\."
                            r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_STACKED_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<proj>gate_proj|up_proj)$")
# Anything under an experts module: a key that matches this but none of the three layouts is an unknown layout, and
# must not be passed through silently as if it were an ordinary (non-expert) tensor.
_ANY_EXPERT_RE = re.compile(r"\.mlp\.experts\.")


@dataclass(frozen=True)
class ExpertKey:
    """Where one checkpoint key sits among a layer's expert tensors."""

    layout: str
    layer: int
    prefix: str  # e.g. "model.layers.3.mlp.experts"
    proj: str  # gate_proj / up_proj / down_proj / gate_up_proj
    expert: int | None = None  # only for the per-expert layout


def parse_expert_key(key: str, stacked_down: bool = False) -> ExpertKey | None:
    """Classify a checkpoint key; None for every non-expert tensor.

    `...mlp.experts.down_proj` is ambiguous (fused and stacked share it); `stacked_down` says which one the file is.
    """
    m = _PER_EXPERT_RE.match(key)
    if m:
        return ExpertKey(PER_EXPERT, int(m["layer"]), m["prefix"], m["proj"], int(m["expert"]))
    m = _STACKED_RE.match(key)
    if m:
        return ExpertKey(STACKED, int(m["layer"]), m["prefix"], m["proj"])
    m = _FUSED_RE.match(key)
    if m:
        layout = STACKED if (stacked_down and m["proj"] == "down_proj") else FUSED
        return ExpertKey(layout, int(m["layer"]), m["prefix"], m["proj"])
    return None


def detect_layout(keys: list[str] | set[str]) -> str | None:
    """The expert layout of a checkpoint from its key names; None when it holds no expert tensors.

    Raises ValueError when one checkpoint mixes layouts.
    """
    found = set()
    for key in keys:
        if _PER_EXPERT_RE.match(key):
            found.add(PER_EXPERT)
        elif _STACKED_RE.match(key):
            found.add(STACKED)
        elif _FUSED_RE.match(key) and key.endswith("gate_up_proj"):
            found.add(FUSED)
    if len(found) > 1:
        raise ValueError(f"checkpoint mixes expert layouts {sorted(found)}; convert it with tools/moe_merge.py or "
                         "tools/moe_split.py from one consistent source")
    return found.pop() if found else None


def unknown_expert_keys(keys: list[str] | set[str]) -> list[str]:
    """Keys under an `.mlp.experts.` module that belong to none of the known layouts (sorted)."""
    return sorted(k for k in keys if _ANY_EXPERT_RE.search(k) and not (
        _PER_EXPERT_RE.match(k) or _STACKED_RE.match(k) or _FUSED_RE.match(k)))


def fused_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"


def per_expert_key(prefix: str, expert: int, proj: str) -> str:
    return f"{prefix}.{expert}.{proj}.weight"


def stacked_keys(prefix: str) -> tuple[str, str, str]:
    return f"{prefix}.gate_proj", f"{prefix}.up_proj", f"{prefix}.down_proj"


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        hint = ""
        if tuple(tensor.shape) == tuple(reversed(expected)) or sorted(tensor.shape) == sorted(expected):
            hint = " (transposed? this layout stores [out_features, in_features])"
        raise ValueError(f"{key}: expected shape {list(expected)}, found {list(tensor.shape)}{hint}")


def check_dtype(key: str, dtype: object, expected: object, reference: str) -> None:
    """All expert tensors of a layer share one dtype; stacking mixed dtypes would silently promote them."""
    if dtype != expected:
        raise ValueError(f"{key}: dtype {dtype} differs from {expected} of {reference}")


def per_expert_to_fused(prefix: str, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor],
                        hidden: int, inter: int, first_expert: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-expert [I,H]/[I,H]/[H,I] tensors (experts first_expert, first_expert+1, ...) into gate_up [E,2I,H]
    and down [E,H,I]."""
    for e, (g, u, d) in enumerate(zip(gate, up, down), start=first_expert):
        check_shape(per_expert_key(prefix, e, "gate_proj"), g, (inter, hidden))
        check_shape(per_expert_key(prefix, e, "up_proj"), u, (inter, hidden))
        check_shape(per_expert_key(prefix, e, "down_proj"), d, (hidden, inter))
    gate_up = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
    return gate_up, torch.stack(down)


def stacked_to_fused(prefix: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int,
                     hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The older [E,I,H]/[E,I,H]/[E,H,I] triple as gate_up [E,2I,H] and down [E,H,I]."""
    g_key, u_key, d_key = stacked_keys(prefix)
    check_shape(g_key, gate, (num_experts, inter, hidden))
    check_shape(u_key, up, (num_experts, inter, hidden))
    check_shape(d_key, down, (num_experts, hidden, inter))
    return torch.cat([gate, up], dim=1), down


def fused_to_per_expert(prefix: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """gate_up [E,2I,H] and down [E,H,I] as the hub's per-expert tensors (contiguous copies, same dtype)."""
    num_experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    out: dict[str, torch.Tensor] = {}
    for e in range(num_experts):
        out[per_expert_key(prefix, e, "gate_proj")] = gate_up[e, :inter].contiguous()
        out[per_expert_key(prefix, e, "up_proj")] = gate_up[e, inter:].contiguous()
        out[per_expert_key(prefix, e, "down_proj")] = down[e].contiguous()
    return out
