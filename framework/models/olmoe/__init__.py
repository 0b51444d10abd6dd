from framework.lazy_exports import lazy_exports

__all__ = ["OLMOE", "OlmoeCausalLM"]
_MODEL = "framework.models.olmoe.model"
# on first use: importing the family's config module (the registry does) must not import its model code
__getattr__, __dir__ = lazy_exports(globals(), {"OLMOE": _MODEL, "OlmoeCausalLM": _MODEL})
