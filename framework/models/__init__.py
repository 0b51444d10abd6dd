from framework.models.decoder import CausalLMOutput, MoECausalLM
from framework.models.load import load_model

__all__ = ["CausalLMOutput", "MoECausalLM", "load_model"]
