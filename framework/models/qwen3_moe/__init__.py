from framework.models.qwen3_moe.model import QWEN3_MOE, Qwen3MoeCausalLM

__all__ = ["QWEN3_MOE", "Qwen3MoeCausalLM"]
