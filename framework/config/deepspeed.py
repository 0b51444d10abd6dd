"""The DeepSpeed JSON a run uses: built from the YAML, or a user's JSON checked against it and completed.

Owns: one source of truth per setting. The YAML owns the batch sizes, the optimizer, the lr schedule, clipping and
the precision; a user's JSON owns ZeRO and communication knobs. A JSON value that restates a YAML one must agree
(or be "auto"); an optimizer or scheduler block in the JSON is refused rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any

from framework.config.load import ConfigError, gradient_accumulation_steps
from framework.config.schema import RunConfig
from framework.zero.engine import check_ds_config

# Per-stage ZeRO defaults. Buckets and prefetch of 5e8 elements hold a 30B-A3B layer's local experts; the persistence
# threshold keeps routers and norms (< 1e6 elements) resident instead of gathering them every forward.
ZERO_DEFAULTS: dict[int, dict[str, Any]] = {
    0: {},
    1: {"reduce_bucket_size": 5e8},
    2: {"overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True, "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8},
    3: {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
        "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e6,
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9},
}
_YAML_OWNED = ("optimizer", "scheduler", "fp16", "bf16")


def build_ds_config(cfg: RunConfig, world_size: int, bf16: bool, user: dict[str, Any] | None = None,
                    source: str = "DeepSpeed config") -> dict[str, Any]:
    gas = gradient_accumulation_steps(cfg, world_size)
    ds: dict[str, Any] = dict(user or {})
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
    zero["stage"] = stage
    ds["zero_optimization"] = zero
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    ds.setdefault("wall_clock_breakdown", False)
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": cfg.train.lr, "betas": [cfg.train.adam_beta1, cfg.train.adam_beta2], "eps": cfg.train.adam_eps,
        "weight_decay": cfg.train.weight_decay, "torch_adam": True, "adam_w_mode": True}}
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
