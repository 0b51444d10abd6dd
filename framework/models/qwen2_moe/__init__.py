from framework.models.qwen2_moe.model import QWEN2_MOE, Qwen2MoeCausalLM

__all__ = ["QWEN2_MOE", "Qwen2MoeCausalLM"]
