"""Mixture-of-Experts language model training on DeepSpeed with a dropless grouped-GEMM MoE layer."""

from framework.models import CausalLMOutput, MoECausalLM, load_model
from framework.models.qwen3_moe import Qwen3MoeCausalLM

__all__ = ["CausalLMOutput", "MoECausalLM", "Qwen3MoeCausalLM", "load_model"]
__version__ = "0.1.0"
