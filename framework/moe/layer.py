"""The sparse MoE block: router -> dispatch -> experts -> combine, dropless.

Legend: B batch, S sequence, T = B*S tokens, H hidden, I expert FFN, E experts, K top-k, R = T*K rows.
Parameter names equal transformers 5's Qwen3MoeSparseMoeBlock (`gate.weight`, `experts.gate_up_proj`,
`experts.down_proj`), so state dicts move between the two unchanged. Expert parallelism is a construction input
(`placement`, framework/moe/placement.py): the block holds its experts only and dispatches through the placement's
dispatcher.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.moe.aux_loss import RouterStats, router_stats
from framework.moe.dispatch import Dispatcher, MegablocksDispatcher, TorchDispatcher
from framework.moe.experts import compute_fn, resolve_backend
from framework.moe.placement import LOCAL, ExpertPlacement


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked; `forward` runs them on rows grouped by expert, each row's output scaled by
    its routing weight when weights are given."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: nn.Module, backend: str,
                 first_expert: int = 0):
        super().__init__()
        self.num_experts = num_experts  # held here: all of them, or this rank's block under expert parallelism
        self.first_expert = first_expert  # global id of expert 0 here
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = act
        self.backend = backend
        self._compute = compute_fn(backend)

    def forward(self, rows_RH: torch.Tensor, group_ends_E: torch.Tensor,
                weights_R: torch.Tensor | None = None) -> torch.Tensor:
        return self._compute(rows_RH, group_ends_E, weights_R, self.gate_up_proj, self.down_proj, self.act_fn)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={two_i // 2}, backend={self.backend}"


class MoEBlock(nn.Module):
    """`router` is `gate` (state dict `gate.weight`, ...): any module returning a `Routing` (router.py). A family with
    shared experts subclasses this block, adds them as its own named modules and returns their output from
    `shared_output`, which is added to the routed experts' (their parameters are not experts: ZeRO and expert
    parallelism treat them as dense)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, router: nn.Module,
                 act: nn.Module, backend: str = "auto", placement: ExpertPlacement = LOCAL, z_loss: bool = False):
        super().__init__()
        self.z_loss = z_loss  # the router statistics include the z-loss sum (only when the loss uses it)
        backend = resolve_backend(backend)
        lo, hi = placement.expert_range(num_experts)
        self.gate = router
        self.experts = GroupedExperts(hi - lo, hidden_size, intermediate_size, act, backend, first_expert=lo)
        self.num_experts = num_experts  # global
        if placement.make_dispatcher is not None:
            self.dispatcher: Dispatcher = placement.make_dispatcher(num_experts)
        else:
            self.dispatcher = MegablocksDispatcher(num_experts) if backend == "megablocks" else TorchDispatcher()

    def forward(self, x_BSH: torch.Tensor, token_mask_T: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterStats]:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        routing = self.gate(x_TH)
        y_TH = self.dispatcher.route(routing, self.num_experts, self.experts)
        shared_TH = self.shared_output(x_TH)
        if shared_TH is not None:
            y_TH = y_TH + shared_TH
        return y_TH.view_as(x_BSH), router_stats(routing, token_mask_T, self.z_loss)

    def shared_output(self, x_TH: torch.Tensor) -> torch.Tensor | None:
        """What the family's shared experts add for every token ([T, H]); None: there are none."""
        return None
