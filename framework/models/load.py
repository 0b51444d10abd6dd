"""Building a model of any registered family (framework/models/registry.py) from a config or a Hugging Face
checkpoint directory.

Owns: `load_model`, the public entry point: config checks, construction, random init or a streaming load of every
tensor (any of the three expert layouts), with one-line errors naming the key and both shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from framework.checkpoint.hf_reader import HFCheckpoint
from framework.models.attention import resolve_attention
from framework.models.options import ModelOptions
from framework.models.decoder import MoECausalLM
from framework.models.family import Family
from framework.models.registry import family_for
from framework.moe.placement import LOCAL, ExpertPlacement

_EXPERT_PARAM_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_EMBED, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def has_weights(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def load_model(path_or_config: str | dict | PretrainedConfig, backend: str = "auto", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str | None = None,
               aux_loss_coef: float | None = None, z_loss_coef: float = 0.0, seed: int = 0,
               aux_loss_scope: str = "pooled", activation_checkpointing: bool | str = False,
               loss_chunk_tokens: int = 0, placement: ExpertPlacement = LOCAL,
               router_bias_update_rate: float = 0.0) -> MoECausalLM:
    """A causal LM on our MoE layer, of the family config.json's model_type names (qwen3_moe, mixtral, qwen2_moe,
    olmoe, deepseek_v3).

    `path_or_config`: an HF checkpoint directory (per-expert, fused or stacked expert layout), a directory or path of a
    config.json, a config dict or a transformers config (the last three: random initialisation with `seed`).
    `backend` ... `loss_chunk_tokens`, `router_bias_update_rate`: how the model computes and balances
    (framework/models/options.py ModelOptions).
    `placement`: the experts this process holds and how tokens reach the others (expert parallelism:
    framework/parallel/expert_parallel.py `expert_placement`); only those experts are allocated, read or
    initialised. Random initialisation is seeded per parameter and per expert: the same weights whatever the
    placement keeps.
    tie_word_embeddings: lm_head.weight is embed_tokens.weight (one Parameter, initialised or read once; a checkpoint
    may hold either key, or both if equal, as transformers reads them).
    """
    family = family_for(path_or_config)
    config = family.load_config(path_or_config)
    config = type(config).from_dict(config.to_dict())  # our own copy: we set the attention implementation on it
    config._attn_implementation = resolve_attention(attn_implementation or "sdpa")
    options = ModelOptions(backend=backend, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                           aux_loss_scope=aux_loss_scope, activation_checkpointing=activation_checkpointing,
                           loss_chunk_tokens=loss_chunk_tokens, placement=placement,
                           router_bias_update_rate=router_bias_update_rate)
    with torch.device("meta"):
        model = family.causal_lm(config, options)
    model.to_empty(device=device)
    model.to(dtype)
    # Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild them for real.
    model.model.rotary_emb = model.architecture.rotary(config=config).to(device)
    if isinstance(path_or_config, str) and has_weights(path_or_config):
        load_hf_weights(model, path_or_config, _key_map(family, config))
    else:
        model.init_weights(seed)
    return model


def _key_map(family: Family, config: PretrainedConfig) -> Callable[[str], str | None] | None:
    """The family's checkpoint key map, with the tensors it ignores mapped to None (left unread)."""
    rename, ignored = family.checkpoint_key, family.ignored_key
    if ignored is None:
        return rename
    return lambda key: None if ignored(config, key) else (rename(key) if rename else key)


def _tied_key(ckpt: HFCheckpoint, path: str, available: set[str]) -> str:
    """The checkpoint key to read a tied embedding / LM head from, as transformers ties them: the embedding (a tied
    model's save_pretrained writes only that), else lm_head.weight; both present must be equal, where transformers
    would warn and untie, i.e. not load the model config.json describes."""
    if _EMBED not in available and _LM_HEAD in available:
        return _LM_HEAD
    if _EMBED in available and _LM_HEAD in available and not torch.equal(ckpt.get(_EMBED), ckpt.get(_LM_HEAD)):
        raise ValueError(f"{path}: config.json has tie_word_embeddings true but the checkpoint's {_LM_HEAD} differs "
                         f"from {_EMBED}; set tie_word_embeddings false to load them untied")
    return _EMBED


@torch.no_grad()
def load_hf_weights(model: MoECausalLM, path: str, key_map: Callable[[str], str] | None = None) -> None:
    """Copy every tensor of an HF checkpoint into `model`, converting expert layouts; strict about names and shapes.
    `key_map`: the family's stored key -> transformers 5 name (registry.py Family.checkpoint_key). Persistent buffers
    (a router's e_score_correction_bias) are read like parameters, keeping the buffer's own dtype."""
    config = model.config
    num_experts = model.architecture.layout.moe_shape(config)[1]
    persistent = set(model.state_dict())
    buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
    with HFCheckpoint(path, key_map) as ckpt:
        available = set(ckpt.non_expert_keys())
        used: set[str] = set()
        # named_parameters() names a tied LM head once, as model.embed_tokens.weight
        for name, param in [*model.named_parameters(), *buffers]:
            if _EXPERT_PARAM_RE.match(name):
                continue  # experts are read layer by layer below
            key = name
            if param is model.lm_head.weight and name != _LM_HEAD:  # tied
                key = _tied_key(ckpt, path, available)
                used.update(k for k in (_EMBED, _LM_HEAD) if k in available)
            if key not in available:
                raise ValueError(f"{path}: checkpoint has no tensor {name} (shape {list(param.shape)}); "
                                 "does config.json match the weights?")
            tensor = ckpt.get(key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{path}: {key}: model expects shape {list(param.shape)}, checkpoint has "
                                 f"{list(tensor.shape)} (does config.json match the weights?)")
            param.copy_(tensor)
            used.add(key)
        unexpected = sorted(available - used)
        if unexpected:
            raise ValueError(f"{path}: checkpoint tensor(s) the model does not have: {', '.join(unexpected[:3])}"
                             f"{' ...' if len(unexpected) > 3 else ''} (does config.json match the weights?)")
        moe_layers = sorted({int(m.group(1)) for n, _ in model.named_parameters()
                             if (m := _EXPERT_PARAM_RE.match(n))})
        extra_layers = sorted(set(ckpt.layers) - set(moe_layers))
        if extra_layers:
            raise ValueError(f"{path}: checkpoint has experts for layer {extra_layers[0]}, which config.json makes "
                             "a dense layer (mlp_only_layers / decoder_sparse_step)")
        for layer in moe_layers:
            experts = model.model.layers[layer].mlp.experts
            expert_range = (experts.first_expert, experts.first_expert + experts.num_experts)
            inter = experts.down_proj.shape[-1]  # the family's expert FFN width (moe_intermediate_size, ...)
            gate_up, down = ckpt.read_layer_experts(layer, num_experts, config.hidden_size, inter,
                                                    expert_range=expert_range)
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
