from typing import TYPE_CHECKING

from framework.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from framework.models.decoder import CausalLMOutput, MoECausalLM
    from framework.models.load import load_model

__all__ = ["CausalLMOutput", "MoECausalLM", "load_model"]
# on first use, so that framework.models.registry / family / a family's config import no model code (lazy_exports.py)
__getattr__, __dir__ = lazy_exports(globals(), {"CausalLMOutput": "framework.models.decoder",
                                                "MoECausalLM": "framework.models.decoder",
                                                "load_model": "framework.models.load"})
