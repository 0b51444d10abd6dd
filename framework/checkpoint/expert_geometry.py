"""The expert geometry of a checkpoint directory, as its model family's own checked config defines it.

Owns: `ExpertGeometry` (which layers are MoE, how many experts, their hidden and FFN widths) and the hub <-> our
tensor-name maps of the checkpoint's family, for the conversion tools (moe_merge / moe_split / ds_to_hf). The family
(framework/models/registry.py) is the one place that knows a model type's field names (Mixtral: num_local_experts,
intermediate_size; Qwen3-MoE: num_experts, moe_intermediate_size) and its dense-layer rule, so a family registered
there converts without a change here. Does not own model construction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from framework.checkpoint.hf_layout import PER_EXPERT
from framework.models.family import Family
from framework.models.registry import family_for, layout_for, moe_shape

CONFIG_NAME = "config.json"


def _same(key: str) -> str:
    return key


@dataclass(frozen=True)
class ExpertGeometry:
    family: Family
    num_experts: int
    hidden_size: int
    expert_width: int  # one expert's FFN width I (gate / up are [I, H], down [H, I])
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    source: str  # where the config came from, for error messages

    @property
    def checkpoint_key(self) -> Callable[[str], str]:
        """A stored key -> our (transformers 5) name; the identity where the family's hub spells them alike."""
        return self.family.checkpoint_key or _same

    def written_name(self, layout: str) -> Callable[[str], str]:
        return written_name(self.family, layout)


def written_name(family: Family | None, layout: str) -> Callable[[str], str]:
    """Our name -> the name a checkpoint in `layout` stores: the family's hub spelling for per_expert (stock
    `from_pretrained` maps only those to its fused parameters; Mixtral: block_sparse_moe.experts.{e}.w1 / w3 / w2),
    our names for fused (which stock transformers reads as they are). The one rule for every writer (moe_split,
    ds_to_hf, the trainer's export)."""
    hub_key = family.hub_key if family is not None else None
    return (hub_key or _same) if layout == PER_EXPERT else _same


def read_expert_geometry(checkpoint_dir: str) -> ExpertGeometry:
    """The geometry from `checkpoint_dir/config.json` through its family's config check; ValueError /
    FileNotFoundError with one-line messages (unknown model_type, missing fields, ...)."""
    family = family_for(checkpoint_dir)
    config = family.load_config(checkpoint_dir)
    width, num_experts, _, _ = moe_shape(config)
    is_moe = layout_for(config).is_moe_layer
    layers = tuple(i for i in range(config.num_hidden_layers) if is_moe(config, i))
    return ExpertGeometry(family, int(num_experts), int(config.hidden_size), int(width),
                          int(config.num_hidden_layers), layers, os.path.join(checkpoint_dir, CONFIG_NAME))
