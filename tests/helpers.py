"""Shared test fixtures: a tiny Qwen3-MoE config (and tiny Mixtral, Qwen2-MoE and OLMoE run configs), comparison
helpers and the tools/ scripts as modules."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from safetensors import safe_open
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

# H != I and H != 2I so a gate/up or transpose mix-up cannot pass by shape; multiples of 8 for _grouped_mm strides.
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")  # hub per-expert names of most families
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[1], router_aux_loss_coef=0.02, output_router_logits=True,
            max_position_embeddings=64, tie_word_embeddings=False)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """tools/<name>.py as a module (its `main(argv)` is what the command runs)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as `import` would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_config(attn: str = "eager", **overrides) -> Qwen3MoeConfig:
    config = Qwen3MoeConfig(**{**TINY, **overrides})
    config._attn_implementation = attn
    config._experts_implementation = "eager"
    return config


def stock_model(seed: int = 0, attn: str = "eager", **overrides) -> Qwen3MoeForCausalLM:
    """Stock transformers model with eager experts and non-trivial weights everywhere (norms too)."""
    torch.manual_seed(seed)
    return spread_weights(Qwen3MoeForCausalLM(tiny_config(attn, **overrides)).float())


@torch.no_grad()
def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere, drawn from the global generator; returns the model in eval mode."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)  # ones would hide a missing norm weight
        elif "gate.weight" in name:
            p.normal_(0.0, 0.5)  # spread router logits so top-k choices are not near ties
        else:
            p.normal_(0.0, 0.1)
    return model.eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def batch(seed: int = 1, bsz: int = 3, seq: int = 11, vocab: int = 96, pad_right: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    if pad_right:
        mask[1, seq - 4:] = 0
        mask[2, seq - 1:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in a directory (a sharded HF checkpoint), by name."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# model_configs/tiny.yaml's widths as Mixtral fields (every layer MoE): for trainer runs of the Mixtral family
TINY_MIXTRAL_RUN = dict(model_type="mixtral", vocab_size=4096, hidden_size=32, intermediate_size=24,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                        max_position_embeddings=256, tie_word_embeddings=False)


# the same widths as Qwen2-MoE fields: the middle layer dense, plus a shared expert (H != its width != 2 x 24)
TINY_QWEN2_MOE_RUN = dict(model_type="qwen2_moe", vocab_size=4096, hidden_size=32, intermediate_size=40,
                          moe_intermediate_size=24, shared_expert_intermediate_size=56, num_hidden_layers=3,
                          mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                          num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=256,
                          tie_word_embeddings=False)

# ... and as OLMoE fields (every layer MoE, experts intermediate_size wide; clip_qkv as the released checkpoints
# leave it, null)
TINY_OLMOE_RUN = dict(model_type="olmoe", vocab_size=4096, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                      router_aux_loss_coef=0.02, max_position_embeddings=256, tie_word_embeddings=False,
                      pad_token_id=1, eos_token_id=2)

# ... and as DeepSeek-V3 fields: MLA (qk 8 + 8, v 8, no q_lora_rank), layer 0 dense, 8 experts in 4 groups, top-2
TINY_DEEPSEEK_RUN = dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=32, intermediate_size=40,
                         moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                         n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                         first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         max_position_embeddings=256, tie_word_embeddings=False)

RUN_HF_CONFIGS = {"mixtral": TINY_MIXTRAL_RUN, "qwen2_moe": TINY_QWEN2_MOE_RUN, "olmoe": TINY_OLMOE_RUN,
                  "deepseek_v3": TINY_DEEPSEEK_RUN}


def write_family_run_yaml(path: str, family: str, **hf_overrides) -> str:
    """model_configs/tiny.yaml with its model.hf_config replaced by the tiny model of `family` (a RUN_HF_CONFIGS key);
    returns `path`."""
    return write_run_yaml(path, {**RUN_HF_CONFIGS[family], **hf_overrides})


def write_run_yaml(path: str, hf_config: dict, **model_overrides) -> str:
    """model_configs/tiny.yaml with its model.hf_config replaced by `hf_config` (and model.* keys overridden);
    returns `path`."""
    import yaml  # noqa: PLC0415

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "model_configs", "tiny.yaml")) as f:
        run = yaml.safe_load(f)
    run["model"]["hf_config"] = dict(hf_config)
    run["model"].update(model_overrides)
    with open(path, "w") as f:
        yaml.safe_dump(run, f)
    return path


def write_mixtral_run_yaml(path: str, **hf_overrides) -> str:
    """model_configs/tiny.yaml with its model.hf_config replaced by a tiny Mixtral; returns `path`."""
    return write_family_run_yaml(path, "mixtral", **hf_overrides)


def write_qwen2_moe_run_yaml(path: str, **hf_overrides) -> str:
    """model_configs/tiny.yaml with its model.hf_config replaced by a tiny Qwen2-MoE; returns `path`."""
    return write_family_run_yaml(path, "qwen2_moe", **hf_overrides)


def write_olmoe_run_yaml(path: str, **hf_overrides) -> str:
    """model_configs/tiny.yaml with its model.hf_config replaced by a tiny OLMoE; returns `path`."""
    return write_family_run_yaml(path, "olmoe", **hf_overrides)


def write_hub_per_expert(stock: torch.nn.Module, path: str, names: tuple[str, str, str] = GATE_UP_DOWN,
                         moe_module: str = "mlp") -> None:
    """A stock model's weights in its hub's per-expert layout, written by hand (the inverse of transformers'
    conversion_mapping.py): each expert's gate / up / down matrices as `{moe_module}.experts.{e}.{name}.weight`
    (Qwen-style names by default; Mixtral: names ("w1", "w3", "w2") under "block_sparse_moe"). A tied LM head is left
    out, as a tied model's save_pretrained leaves it out."""
    from safetensors.torch import save_file  # noqa: PLC0415

    gate, up, down = names
    tensors = {}
    for key, value in stock.state_dict().items():
        hub = key.replace(".mlp.", f".{moe_module}.")
        if key.endswith("experts.gate_up_proj"):
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[hub.replace("gate_up_proj", f"{e}.{gate}.weight")] = value[e, :inter].clone()
                tensors[hub.replace("gate_up_proj", f"{e}.{up}.weight")] = value[e, inter:].clone()
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                tensors[hub.replace("down_proj", f"{e}.{down}.weight")] = value[e].clone()
        elif key != "lm_head.weight" or not stock.config.tie_word_embeddings:
            tensors[hub] = value.clone()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    stock.config.save_pretrained(path)


def assert_state_dicts_interchange(ours: torch.nn.Module, stock_class: type, stock_config,
                                   stock_sd: dict[str, torch.Tensor]) -> None:
    """Our state dict loads strictly into a fresh stock model (`stock_class(stock_config)`) and comes out equal, and
    the stock state dict loads strictly into ours and comes out equal."""
    ours_sd = ours.state_dict()
    fresh = stock_class(stock_config)
    res = fresh.load_state_dict(ours_sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ours_sd[k]), k
    res = ours.load_state_dict(stock_sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in ours.state_dict().items():
        assert torch.equal(v, stock_sd[k]), k
