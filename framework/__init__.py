"""Qwen3-MoE training on DeepSpeed with a dropless grouped-GEMM MoE layer."""

from framework.models.qwen3_moe import CausalLMOutput, Qwen3MoeCausalLM, load_model

__all__ = ["CausalLMOutput", "Qwen3MoeCausalLM", "load_model"]
__version__ = "0.1.0"
