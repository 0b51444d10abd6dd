from framework.models.qwen3_moe.load import load_model
from framework.models.qwen3_moe.model import CausalLMOutput, Qwen3MoeCausalLM

__all__ = ["CausalLMOutput", "Qwen3MoeCausalLM", "load_model"]
