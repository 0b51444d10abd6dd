"""Single-process EP=1 reference for the expert-parallel runs: same init, same global batch, plain torch."""

from __future__ import annotations

import torch

import framework
from tests.distributed.common import CLIP, LR, MICRO, STEPS, WD, global_batch, model_config


def single_process_run(world: int, tied: bool = False, family: str | None = None) -> dict:
    config = model_config(tied, family)
    model = framework.load_model(config, backend="grouped_mm", attn_implementation="eager", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    ids, mask, labels = global_batch(world, vocab_size=config["vocab_size"])
    result = {"losses": [], "norms": [], "initial": {n: p.detach().clone() for n, p in model.named_parameters()}}
    for step in range(STEPS):
        # each data-parallel rank averages its own micro-batch; DeepSpeed then averages over ranks
        losses = [model(ids[r * MICRO:(r + 1) * MICRO], attention_mask=mask[r * MICRO:(r + 1) * MICRO],
                        labels=labels[r * MICRO:(r + 1) * MICRO]).loss for r in range(world)]
        loss = torch.stack(losses).mean()
        loss.backward()
        if step == 0:
            result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        result["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        result["losses"].append(loss.item())
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return result
