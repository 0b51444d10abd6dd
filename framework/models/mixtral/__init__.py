from framework.models.mixtral.model import MixtralCausalLM

__all__ = ["MixtralCausalLM"]
