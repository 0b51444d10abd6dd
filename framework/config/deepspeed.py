"""The DeepSpeed JSON a run uses: built from the YAML, or a user's JSON checked against it and completed.

Owns: one source of truth per setting. The YAML owns the batch sizes, the optimizer, the lr schedule, clipping and
the precision; a user's JSON owns ZeRO and communication knobs. A JSON value that restates a YAML one must agree
(or be "auto"); an optimizer or scheduler block in the JSON is refused rather than silently ignored.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

import torch

from framework.config.load import ConfigError, gradient_accumulation_steps
from framework.config.schema import RunConfig
from framework.zero.engine import check_ds_config

# Per-stage ZeRO defaults; "auto" marks the values sized from the model (see auto_sizes). Without a model at hand
# (estimates before one is built) the autos fall back to 5e8 buckets and a 1e6 persistence threshold.
ZERO_DEFAULTS: dict[int, dict[str, Any]] = {
    0: {},
    1: {"reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
    2: {"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True, "reduce_bucket_size": "auto",
        "allgather_bucket_size": "auto"},
    3: {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9},
}
FALLBACK_AUTO = {"bucket": int(5e8), "persistence": int(1e6)}
_YAML_OWNED = ("optimizer", "scheduler", "fp16", "bf16")
_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "prefetch_bucket_size")
_PERSISTENCE_KEYS = ("stage3_param_persistence_threshold", "param_persistence_threshold")


def auto_sizes(hf_config, ep_size: int) -> dict[str, int]:
    """Bucket = one MoE layer's local expert tensors (E/ep x 3 x H x I elements): a reduce or a prefetch then moves a
    whole layer's experts at once instead of several partial rounds (HF's "auto" of H^2 is 100x too small for MoE).
    Persistence threshold = just above the router (E x H): routers and norms stay resident on every rank instead of
    being gathered each forward; the smallest projection (k/v: H x kv_heads x head_dim) stays partitioned."""
    if hf_config is None:
        return dict(FALLBACK_AUTO)
    from framework.models.registry import head_dim, moe_shape  # noqa: PLC0415

    h = hf_config.hidden_size
    expert_width, num_experts, _, _ = moe_shape(hf_config)  # family field names differ (Mixtral: num_local_experts)
    local_experts = max(1, num_experts // ep_size)
    bucket = local_experts * 3 * h * expert_width
    router = num_experts * h
    smallest_projection = h * hf_config.num_key_value_heads * head_dim(hf_config)
    return {"bucket": max(bucket, int(1e7)), "persistence": min(router + 1, smallest_projection)}


def _known_top_level_keys() -> set[str]:
    """DeepSpeed reads its JSON with dict.get, so it never rejects a misspelt key. Its key names are the lowercase
    string constants of its config modules, plus the section names below that live elsewhere."""
    import importlib  # noqa: PLC0415

    keys = {"zero_optimization", "tensorboard", "wandb", "csv_monitor", "comet", "expert_parallel", "compile",
            "timers", "tensor_parallel", "sequence_parallel_size", "sparse_gradients", "amp", "elasticity",
            "graph_harvesting", "pld", "hybrid_engine", "weight_quantization", "compression_training",
            "zero_force_ds_cpu_optimizer", "zero_allow_untested_optimizer", "flops_profiler", "comms_logger",
            "checkpoint", "aio", "data_efficiency", "autotuning", "activation_checkpointing", "nebula"}
    for name in ("deepspeed.runtime.constants", "deepspeed.runtime.activation_checkpointing.config",
                 "deepspeed.profiling.constants", "deepspeed.autotuning.constants", "deepspeed.comm.constants",
                 "deepspeed.runtime.data_pipeline.constants", "deepspeed.runtime.swap_tensor.constants",
                 "deepspeed.checkpoint.constants"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        keys.update(v for k, v in vars(module).items()
                    if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]*", v))
    return keys


def check_user_json(user: dict[str, Any], source: str) -> None:
    """Unknown or misspelt keys: one line with the closest known key (DeepSpeed would ignore a top-level typo and
    print a multi-line pydantic error for a ZeRO one)."""
    known = _known_top_level_keys()
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"{source}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be an object")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    fields = set(DeepSpeedZeroConfig.model_fields)
    fields |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    for key in zero:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            raise ConfigError(f"{source}: unknown key zero_optimization.{key}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: zero_optimization.{where}: {first['msg']} (found {first.get('input')!r})") from None


def build_ds_config(cfg: RunConfig, world_size: int, bf16: bool, user: dict[str, Any] | None = None,
                    source: str = "DeepSpeed config", hf_config=None) -> dict[str, Any]:
    """The resolved DeepSpeed JSON. `hf_config` sizes the "auto" buckets (see auto_sizes); None: fallback sizes."""
    gas = gradient_accumulation_steps(cfg, world_size)
    if user:
        check_user_json(user, source)
    ds: dict[str, Any] = json.loads(json.dumps(user or {}))  # a deep copy: the caller's dict stays as written
    for key in _YAML_OWNED:
        if key in ds:
            raise ConfigError(f"{source}: remove the {key!r} block; the run's YAML sets it (train.lr, "
                              "train.lr_schedule, train.weight_decay, model.dtype)")
    wanted = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "gradient_accumulation_steps": gas,
              "train_batch_size": cfg.train.global_batch_size, "gradient_clipping": cfg.train.grad_clip}
    yaml_key = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "train_batch_size": "train.global_batch_size",
                "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x processes)",
                "gradient_clipping": "train.grad_clip"}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{source}: {key}={given!r} disagrees with {yaml_key[key]} = {value}; "
                              'remove it or set it to "auto"')
        ds[key] = value
    zero = dict(ds.get("zero_optimization", {}))
    stage = zero.get("stage", cfg.parallel.zero_stage)
    if stage != cfg.parallel.zero_stage:
        raise ConfigError(f"{source}: zero_optimization.stage={stage} disagrees with parallel.zero_stage = "
                          f"{cfg.parallel.zero_stage}")
    for key, value in ZERO_DEFAULTS[stage].items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    sizes = auto_sizes(hf_config, cfg.parallel.ep_size)
    for key, value in list(zero.items()):
        if value == "auto":
            if key in _BUCKET_KEYS:
                zero[key] = sizes["bucket"]
            elif key in _PERSISTENCE_KEYS:
                zero[key] = sizes["persistence"]
            else:
                raise ConfigError(f'{source}: zero_optimization.{key}="auto" is not resolved by this framework; '
                                  "give a value")
    zero["stage"] = stage
    ds["zero_optimization"] = zero
    ds["bf16"] = {"enabled": bf16}
    if world_size == 1 and stage in (1, 2):
        # One process: the mean over data-parallel ranks is the sum. "sum" skips ZeRO-1/2's division of every
        # gradient bucket by 1, a read and a write of all bf16 gradients per step (PERF_NOTES change 17). ZeRO-3
        # divides unconditionally and refuses "sum".
        ds.setdefault("gradient_allreduce_op", "sum")
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    ds.setdefault("wall_clock_breakdown", False)
    # torch's fused AdamW on the GPU (one kernel over all of a partition's states; the default foreach one makes several
    # passes, a visible share of a micro-batch-1 step). With the optimizer offloaded, DeepSpeed's CPU Adam (built on
    # first use) instead, since DeepSpeed refuses a torch optimizer for offloaded states and torch's is several times
    # slower on CPU.
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.train.lr, "betas": [cfg.train.adam_beta1, cfg.train.adam_beta2], "eps": cfg.train.adam_eps,
        "weight_decay": cfg.train.weight_decay, "torch_adam": not offloaded, "adam_w_mode": True}}
    if not offloaded and torch.cuda.is_available():
        ds["optimizer"]["params"]["fused"] = True
    check_ds_config(ds, cfg.parallel.ep_size, source)
    return ds


def read_ds_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed {path}: file does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw
