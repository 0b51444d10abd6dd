"""Mixture-of-Experts language model training on DeepSpeed with a dropless grouped-GEMM MoE layer."""

from typing import TYPE_CHECKING

from framework.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from framework.models import CausalLMOutput, MoECausalLM, load_model
    from framework.models.qwen3_moe import Qwen3MoeCausalLM

__all__ = ["CausalLMOutput", "MoECausalLM", "Qwen3MoeCausalLM", "load_model"]
__version__ = "0.1.0"
# the model code (and transformers' modeling modules) loads on first use: framework.cluster, framework.config, the
# tools and a launch that stops at a configuration error do not need it (framework/lazy_exports.py)
__getattr__, __dir__ = lazy_exports(globals(), {"CausalLMOutput": "framework.models.decoder",
                                                "MoECausalLM": "framework.models.decoder",
                                                "Qwen3MoeCausalLM": "framework.models.qwen3_moe.model",
                                                "load_model": "framework.models.load"})
