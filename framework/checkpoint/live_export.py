"""Export of the live training model to a Hugging Face directory (end of training).

Owns: gathering each parameter in full, one at a time, whatever the ZeRO stage and EP size (ZeRO-3 partitions are
gathered within their partition group, then experts over the EP group), and handing them to rank 0's writer. Every
rank walks the same parameters in the same order (the gathers are collectives); only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

from framework.checkpoint.engine_state import persistent_buffers
from framework.checkpoint.hf_export import write_hf_directory
from framework.models.registry import family_for
from framework.parallel.expert_parallel import gather_full_experts
from framework.parallel.groups import ParallelGroups


def hf_config_dict(config: PretrainedConfig) -> dict:
    """config.json content for stock transformers (AutoModelForCausalLM picks the family's stock class from it)."""
    family = family_for(config)
    raw = config.to_dict()
    raw["architectures"] = [family.stock_class]
    raw["model_type"] = family.model_type
    for private in [k for k in raw if k.startswith("_")]:
        raw.pop(private)
    return raw


def iter_full_parameters(model: nn.Module, groups: ParallelGroups, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor on CPU in `dtype`) for every parameter, in model order, then every persistent buffer in its
    own dtype (a router's e_score_correction_bias stays fp32, as transformers keeps it; buffers are whole and the
    same on every rank). Collective."""
    import deepspeed  # noqa: PLC0415

    for name, param in model.named_parameters():
        partitioned = hasattr(param, "ds_id")  # ZeRO-3
        with deepspeed.zero.GatheredParameters([param], enabled=partitioned):
            full = param.detach().to(dtype).clone()
        if getattr(param, "ds_zero_placement_family", None) is not None and groups.ep_size > 1:
            full = gather_full_experts(full, groups)
        yield name, full.cpu()
    for name, buf in persistent_buffers(model).items():
        yield name, buf.detach().cpu().clone()


def export_live(model: nn.Module, groups: ParallelGroups, out: str, fmt: str, dtype: torch.dtype,
                tokenizer_dir: str | None, max_shard_size: str, overwrite: bool = True) -> None:
    """Collective: every rank gathers, rank 0 writes `out` atomically."""
    tensors = iter_full_parameters(model, groups, dtype)
    if dist.get_rank() == 0:
        write_hf_directory(out, tensors, hf_config_dict(model.config), fmt, tokenizer_dir, max_shard_size,
                           overwrite=overwrite, family=family_for(model.config))
    else:
        for _ in tensors:
            pass
    dist.barrier()
