"""Settings shared by the expert-parallel workers and their single-process reference."""

from __future__ import annotations

import torch

from tests.family_cases import TINY_STOCK_CONFIGS
from tests.helpers import TINY

MICRO, STEPS, LR, WD, CLIP = 2, 3, 1e-3, 0.01, 0.5


def model_config(tied: bool = False, family: str | None = None) -> dict:
    """tied: lm_head.weight is embed_tokens.weight (one parameter that two modules use, for ZeRO-3 and export).
    family: another family's tiny config (tests/family_cases.py), with an aux loss so the router's gradient counts."""
    if family is None:
        return dict(TINY, tie_word_embeddings=tied)
    return dict(TINY_STOCK_CONFIGS[family], model_type=family, tie_word_embeddings=tied, router_aux_loss_coef=0.02)


def global_batch(world: int, seq: int = 12, vocab_size: int = TINY["vocab_size"]):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab_size, (world * MICRO, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding on rank 0 only: exercises the masked aux loss
    return ids, mask, ids.masked_fill(mask == 0, -100)


def ds_config(stage: int, world: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True,
            "reduce_bucket_size": 500}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=500)
    # one process under ZeRO-1/2: "sum", as framework/config/deepspeed.py resolves it (no division by 1)
    one = {"gradient_allreduce_op": "sum"} if world == 1 and stage in (1, 2) else {}
    return {**one, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "gradient_clipping": CLIP, "steps_per_print": 10**9,
            # fused, as the framework runs on GPUs: the clipping factor goes to the optimizer's kernel as grad_scale
            # (framework/zero/optimizer_step.py); torch has fused AdamW on CPU too
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True,
                                                      "fused": True}},
            "zero_optimization": zero, "wall_clock_breakdown": False}
