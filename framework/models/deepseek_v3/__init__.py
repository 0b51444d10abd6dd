from framework.lazy_exports import lazy_exports

__all__ = ["DEEPSEEK_V3", "DeepseekV3CausalLM"]
_MODEL = "framework.models.deepseek_v3.model"
# on first use: importing the family's config module (the registry does) must not import its model code
__getattr__, __dir__ = lazy_exports(globals(), {"DEEPSEEK_V3": _MODEL, "DeepseekV3CausalLM": _MODEL})
