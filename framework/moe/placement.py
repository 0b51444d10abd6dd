"""Which experts a process holds and how tokens reach them: expert parallelism as a construction input.

A model is built with an `ExpertPlacement`, and every MoE block then holds only its block of experts (on the meta
device too, so a rank never allocates, reads or initialises another rank's experts) with the dispatcher that reaches
the others. Single-process code: the dispatcher across ranks comes from the caller (framework/parallel/
expert_parallel.py builds one from the process groups), and so does `block_base`, a class the blocks are built to
derive from as well (DeepSpeed's MoE layer, for ZeRO-1/2's expert handling: framework/zero/deepspeed_moe.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from framework.moe.dispatch import Dispatcher


@dataclass(frozen=True)
class ExpertPlacement:
    ep_size: int = 1
    ep_rank: int = 0
    # the global expert count -> the dispatcher across the EP group; None: tokens stay on this process
    make_dispatcher: Callable[[int], Dispatcher] | None = None
    # every MoE block built with this placement also derives from this class (its __init__ takes no arguments);
    # None: blocks are their own class only
    block_base: type | None = None

    def block_class(self, cls: type) -> type:
        """The class to build an MoE block of class `cls` (MoEBlock or a family's subclass) as."""
        return cls if self.block_base is None else _derived(cls, self.block_base)

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """The contiguous block [lo, hi) of global expert ids held here."""
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                             f"({self.ep_size})")
        per = num_experts // self.ep_size
        return self.ep_rank * per, (self.ep_rank + 1) * per


@functools.cache
def _derived(cls: type, base: type) -> type:
    # cls first, so a family's block keeps its own methods (shared_output); one class per (block class, base) pair
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__})


LOCAL = ExpertPlacement()
