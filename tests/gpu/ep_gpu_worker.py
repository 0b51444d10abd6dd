"""One rank of the GPU expert-parallel parity run (started by test_ep_gpu.py through DeepSpeed's launcher, NCCL).

    python -m deepspeed.launcher.runner --num_gpus N tests/gpu/ep_gpu_worker.py OUT_DIR BACKEND

For ZeRO-3 and ZeRO-2, and EP=1 then EP=N on the same N GPUs: a small Qwen3-MoE in bf16 with the given MoE backend,
3 clipped AdamW steps on a fixed global batch; rank 0 writes losses, global grad norms, the step-0 full gradients and
the final full fp32 parameters to OUT_DIR/stage{S}_ep{E}.pt; first, the same in fp32 with grouped_mm, EP=1, ZeRO-3
(OUT_DIR/fp32_reference.pt).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import framework  # noqa: E402
from framework.cluster.process_group import init_deepspeed_distributed  # noqa: E402
from framework.parallel.expert_parallel import expert_placement  # noqa: E402
from framework.parallel.groups import init_parallel_groups  # noqa: E402
from framework.zero.engine import initialize  # noqa: E402
from tests.distributed.ep_worker import train_and_record  # noqa: E402
from framework.cluster.process_exit import exit_without_teardown  # noqa: E402

CONFIG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
              mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
              num_experts_per_tok=4, norm_topk_prob=True, router_aux_loss_coef=0.01, max_position_embeddings=512,
              tie_word_embeddings=False)
MICRO, SEQ, STEPS, LR, CLIP = 2, 256, 3, 1e-3, 0.5


def ds_config(stage: int, world: int, bf16: bool) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e7}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "train_batch_size": MICRO * world,
            "gradient_clipping": CLIP, "steps_per_print": 10**9, "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": zero}


def run(stage: int, ep: int, backend: str, dtype: torch.dtype, out_dir: str, name: str, chunks: int = 1) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = init_parallel_groups(ep, CONFIG["num_experts"])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script without a GPU
    model = framework.load_model(dict(CONFIG), backend=backend, dtype=dtype, device=device, seed=0,
                                 placement=expert_placement(groups, stage, chunks))
    engine, *_ = initialize(model, ds_config(stage, world, dtype == torch.bfloat16), groups)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, CONFIG["vocab_size"], (world * MICRO, SEQ), generator=g).to(device)
    mine = ids[rank * MICRO:(rank + 1) * MICRO]
    result = train_and_record(engine, groups, lambda: engine(mine, labels=mine), STEPS)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, f"{name}.pt"))
    engine.destroy() if hasattr(engine, "destroy") else None


def main() -> None:
    out_dir, backend = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it first
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    init_deepspeed_distributed("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    # fp32 reference: the yardstick for how far bf16 alone moves the numbers (megablocks is bf16-only)
    run(3, 1, "grouped_mm", torch.float32, out_dir, "fp32_reference")
    for stage in (3, 2):
        for ep in (1, world):
            run(stage, ep, backend, torch.bfloat16, out_dir, f"stage{stage}_ep{ep}")
        # the all-to-alls pipelined in 2 token chunks on NCCL (asynchronous exchanges, parallel.ep_chunks)
        run(stage, world, backend, torch.bfloat16, out_dir, f"stage{stage}_ep{world}_c2", chunks=2)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
