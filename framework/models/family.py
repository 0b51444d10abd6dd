"""What a model family is to the rest of the framework, and reading the raw config a family is chosen from.

Owns: `Family` (one per supported model_type, listed in registry.py), `MoELayout` (which layers are MoE and their
shape, from the config alone), `read_raw_config` and `load_family_config` (the steps every family's config loader
shares). Does not own model code: a family's folder (framework/models/<family>/) holds its own config checks and
`MoELayout` (config.py), and its `Architecture` and causal-LM class (model.py).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig


@dataclass(frozen=True)
class MoELayout:
    """Which decoder layers of a family are MoE and their shape, under the family's own config field names: all that
    the run plan, the DeepSpeed config and the checkpoint tools need of a family's layers. It lives beside the
    family's config, not its model code, so that they import no modeling code (transformers' modeling modules cost
    ~2 s of every process start); the family's `Architecture` (framework/models/decoder.py) carries it."""

    is_moe_layer: Callable[[PretrainedConfig, int], bool]
    # (expert FFN width, experts, top-k, renormalise the top-k weights)
    moe_shape: Callable[[PretrainedConfig], tuple[int, int, int, bool]]
    experts_field: str = "num_experts"  # config field of the expert count, named in config errors
    # its routers select experts on scores + a bias buffer (e_score_correction_bias) that auxiliary-loss-free
    # balancing moves (ModelOptions.router_bias_update_rate)
    router_selection_bias: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str
    load_config: Callable[[Any], PretrainedConfig]  # a checked config from a path / dict / config object
    layout: MoELayout  # its MoE layers (the same object as its Architecture's)
    # "module:Class" of ours (a framework.models.decoder.MoECausalLM), read through `causal_lm`: the registry names it
    # instead of importing it, so that listing the families imports no model code (framework/lazy_exports.py says why)
    causal_lm_path: str
    stock_class: str  # transformers' class, config.json "architectures" on export
    # a stored checkpoint key -> the transformers 5 name our parameters use (hub spellings differ by family)
    checkpoint_key: Callable[[str], str] | None = None
    # the inverse, for `--format hf` exports: our per-expert names -> the hub's (None: they are the same)
    hub_key: Callable[[str], str] | None = None
    # checkpoint tensors the model does not have and transformers skips on load (DeepSeek-V3's multi-token-prediction
    # layers), given the config; None: every tensor must be the model's
    ignored_key: Callable[[PretrainedConfig, str], bool] | None = None

    @property
    def causal_lm(self) -> type:
        """Ours (a framework.models.decoder.MoECausalLM), built as causal_lm(config, options); its module is imported
        on first use (with transformers' modeling code for the family)."""
        module, _, name = self.causal_lm_path.partition(":")
        return getattr(importlib.import_module(module), name)


def read_raw_config(source: str | dict) -> tuple[dict[str, Any], str]:
    """(config dict, where it came from) for a checkpoint directory, a config.json path or a dict."""
    if isinstance(source, dict):
        return dict(source), "config dict"
    where = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.exists(where):
        raise FileNotFoundError(f"no config.json at {where}")
    with open(where) as f:
        return json.load(f), where


def load_family_config(source: Any, config_class: type[PretrainedConfig], model_type: str, name: str,
                       required: Sequence[str], spellings: Sequence[tuple[str, ...]] = ()
                       ) -> tuple[PretrainedConfig, dict[str, Any] | None, str]:
    """(config, its raw dict (None for a config object), where it came from) for a family's config source.

    The fields in `required` must be present, and one name of each tuple in `spellings` (one field spelt two ways,
    e.g. ("num_experts", "num_local_experts")): transformers' config classes fill a missing field with a default
    (128 experts, hidden 4096, ...) that would build a model unlike the checkpoint. Errors are one line naming the file.
    """
    if isinstance(source, config_class):
        return source, None, "config"
    raw, where = read_raw_config(source)
    if raw.get("model_type", model_type) != model_type:
        raise ValueError(f"{where}: model_type is {raw['model_type']!r}, expected {model_type!r}")
    missing = [k for k in required if k not in raw] + [names[0] for names in spellings
                                                        if not any(n in raw for n in names)]
    if missing:
        raise ValueError(f"{where}: missing required {name} field(s) {', '.join(missing)}")
    for names in spellings:
        values = {n: raw[n] for n in names if raw.get(n) is not None}
        if len(set(map(str, values.values()))) > 1:  # the config class would keep one of them silently
            raise ValueError(f"{where}: {' and '.join(f'{n}={v}' for n, v in values.items())} disagree")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    return config_class(**fields), raw, where
