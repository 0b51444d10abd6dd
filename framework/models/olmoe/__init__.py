from framework.models.olmoe.model import OLMOE, OlmoeCausalLM

__all__ = ["OLMOE", "OlmoeCausalLM"]
