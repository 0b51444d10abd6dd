from framework.models.deepseek_v3.model import DEEPSEEK_V3, DeepseekV3CausalLM

__all__ = ["DEEPSEEK_V3", "DeepseekV3CausalLM"]
