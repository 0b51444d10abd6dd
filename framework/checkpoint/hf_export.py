"""Writing a model's full tensors as a Hugging Face directory that stock transformers 5 loads.

Owns: the last step of every export (live at the end of training, offline from a training checkpoint): tensors arrive
one at a time under our parameter names (experts fused, [E, 2I, H] / [E, H, I]), leave as per-expert hub tensors
(`--format hf`) or unchanged (`merged`), in shards, next to config.json and the tokenizer, in a directory that appears
atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import torch

from framework.checkpoint.atomic_dir import atomic_output_dir
from framework.checkpoint.expert_geometry import written_name
from framework.checkpoint.hf_layout import fused_to_per_expert
from framework.checkpoint.hf_writer import ShardedWriter, copy_non_weight_files
from framework.models.family import Family

FORMATS = ("hf", "merged")
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def write_hf_directory(out: str, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict, fmt: str = "hf",
                       tokenizer_dir: str | None = None, max_shard_size: int | str = "5GB",
                       overwrite: bool = False, family: Family | None = None) -> dict:
    """Consume `named_tensors` (our names, full tensors, in model order; a layer's gate_up_proj before its down_proj)
    and write `out`. `config` is the HF config.json content. `family`: `hf`-format keys are written in its hub
    spelling (expert_geometry.written_name; None: our names). Returns the safetensors index."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    tied = bool(config.get("tie_word_embeddings", False))
    layout = "per_expert" if fmt == "hf" else "fused"
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size, metadata={"format": "pt", "expert_layout": layout})
        rename = written_name(family, layout)
        try:
            gate_up: dict[str, torch.Tensor] = {}
            for name, tensor in named_tensors:
                if tied and name == "lm_head.weight":
                    continue
                tensor = tensor.detach().cpu().contiguous()
                match = _FUSED_RE.match(name)
                if match is None or fmt == "merged":
                    writer.add(rename(name), tensor)
                elif match.group(2) == "gate_up_proj":
                    gate_up[match.group(1)] = tensor
                else:
                    prefix = match.group(1)
                    for key, value in fused_to_per_expert(prefix, gate_up.pop(prefix), tensor).items():
                        writer.add(rename(key), value)
            if gate_up:
                raise ValueError(f"export: {sorted(gate_up)[0]}.gate_up_proj came without its down_proj")
            index = writer.close()
        except BaseException:
            writer.abort()
            raise
        if tokenizer_dir is not None:
            copy_non_weight_files(tokenizer_dir, tmp)
        # written after the tokenizer's files: a model directory used as tokenizer carries its own config.json
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return index
