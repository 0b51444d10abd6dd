"""framework/tuning/params.py for every registered family: the parameter count of real shapes (model_configs/*.yaml)
equals stock transformers' count of the same config on the meta device; and every run config in model_configs/ is a
registered family."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from framework.models.registry import FAMILIES, family_for
from framework.tuning.params import param_inventory
from tests.family_cases import MODEL_CONFIGS, REAL_SHAPE_CONFIGS

DEFAULT_MODEL_TYPE = "qwen3_moe"  # what registry.family_for takes a config without model_type for


def hf_config_of(name: str) -> dict:
    with open(os.path.join(MODEL_CONFIGS, name)) as f:
        return dict(yaml.safe_load(f)["model"]["hf_config"])


def stock_names_and_sizes(raw: dict) -> dict[str, int]:
    """Stock transformers' own model of `raw` on the meta device (no memory), parameter name -> elements."""
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    config = AutoConfig.for_model(raw.get("model_type", DEFAULT_MODEL_TYPE), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: p.numel() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_param_count_equals_stock_transformers(model_type):
    names = REAL_SHAPE_CONFIGS[model_type]  # a registered family needs its real-shape cases in the table
    assert names, model_type
    for name in names:
        raw = hf_config_of(name)
        assert raw.get("model_type", DEFAULT_MODEL_TYPE) == model_type, name
        ours = {p.name: p.numel for p in param_inventory(family_for(raw).load_config(raw))}
        stock = stock_names_and_sizes(raw)
        differ = sorted(k for k in set(ours) | set(stock) if ours.get(k) != stock.get(k))
        assert sum(ours.values()) == sum(stock.values()), f"{name}: first differing tensors {differ[:4]}"


def test_real_shape_table_names_existing_configs_of_its_family():
    for model_type, names in REAL_SHAPE_CONFIGS.items():
        for name in names:
            assert hf_config_of(name).get("model_type", DEFAULT_MODEL_TYPE) == model_type, name


def _model_types_of_run_configs() -> dict[str, str]:
    """model_type of every run YAML with an inline model.hf_config (one naming model.path takes the checkpoint's)."""
    out = {}
    for name in sorted(os.listdir(MODEL_CONFIGS)):
        if name.endswith(".yaml"):
            with open(os.path.join(MODEL_CONFIGS, name)) as f:
                model = yaml.safe_load(f)["model"]
            if "hf_config" in model:
                out[name] = model["hf_config"].get("model_type", DEFAULT_MODEL_TYPE)
    return out


def test_every_run_config_is_a_registered_family():
    unregistered = {name: t for name, t in _model_types_of_run_configs().items() if t not in FAMILIES}
    assert not unregistered, f"model_configs/ files whose model_type has no family: {unregistered}"
