from framework.lazy_exports import lazy_exports

__all__ = ["QWEN3_MOE", "Qwen3MoeCausalLM"]
_MODEL = "framework.models.qwen3_moe.model"
# on first use: importing the family's config module (the registry does) must not import its model code
__getattr__, __dir__ = lazy_exports(globals(), {"QWEN3_MOE": _MODEL, "Qwen3MoeCausalLM": _MODEL})
