"""How a model computes, fixed when it is built: the expert backend, attention, the auxiliary losses, recomputation,
loss chunking and expert placement. The model reads them, nothing sets them later (framework.load_model takes them
as keyword arguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.moe.placement import LOCAL, ExpertPlacement

CHECKPOINTING_MODES = (False, True, "moe", "attention")
AUX_LOSS_SCOPES = ("pooled", "per_layer")


@dataclass(frozen=True)
class ModelOptions:
    backend: str = "auto"  # MoE expert compute: auto / megablocks / grouped_mm / eager
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 0.0
    # pooled: transformers' load-balancing statistics summed over layers; per_layer: one loss per layer, averaged
    aux_loss_scope: str = "pooled"
    # True: recompute each decoder layer in backward; "moe" / "attention": only that half of each layer
    activation_checkpointing: bool | str = False
    # > 0: with labels, the LM head and cross-entropy this many tokens at a time (the [B, S, V] logits never exist)
    loss_chunk_tokens: int = 0
    placement: ExpertPlacement = field(default=LOCAL)
    # > 0: auxiliary-loss-free balancing, each router's selection bias moved by this much per optimizer step
    # (framework/moe/bias_balancing.py; the trainer applies it). Only for routers with a bias (deepseek_v3).
    router_bias_update_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"activation_checkpointing {self.activation_checkpointing!r}: expected true, false, "
                             "moe or attention")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"aux_loss_scope {self.aux_loss_scope!r}: expected one of {', '.join(AUX_LOSS_SCOPES)}")
        if self.router_bias_update_rate < 0:
            raise ValueError(f"router_bias_update_rate ({self.router_bias_update_rate}) must be >= 0")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens ({self.loss_chunk_tokens}) must be >= 0")
