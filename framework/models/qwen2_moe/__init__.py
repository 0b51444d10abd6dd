from framework.lazy_exports import lazy_exports

__all__ = ["QWEN2_MOE", "Qwen2MoeCausalLM"]
_MODEL = "framework.models.qwen2_moe.model"
# on first use: importing the family's config module (the registry does) must not import its model code
__getattr__, __dir__ = lazy_exports(globals(), {"QWEN2_MOE": _MODEL, "Qwen2MoeCausalLM": _MODEL})
