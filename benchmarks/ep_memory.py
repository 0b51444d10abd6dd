"""Peak GPU memory and step time of a Qwen3-30B-A3B-width model under ZeRO-3, with and without expert parallelism.

    deepspeed --num_gpus 4 benchmarks/ep_memory.py --ep 4 [--layers 8] [--seq 4096] [--backend auto] [--out F.json]

Random init (seeded per parameter and expert, so every EP size starts from the same weights), bf16, torch AdamW, a fixed
random batch per rank. Prints per step the loss and global grad norm (for bf16 parity across EP sizes) and, at the end,
peak memory per GPU (max over ranks) and the median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import deepspeed
import torch
import torch.distributed as dist

import framework
from framework.parallel.expert_parallel import expert_placement
from framework.parallel.groups import init_parallel_groups
from framework.zero.engine import initialize


def qwen3_30b_width(layers: int, seq: int) -> dict:
    return dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
                max_position_embeddings=seq, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(args.local_rank)
    groups = init_parallel_groups(args.ep, 128)
    model = framework.load_model(qwen3_30b_width(args.layers, args.seq), backend=args.backend, dtype=torch.bfloat16,
                                 device="cuda", seed=0, placement=expert_placement(groups))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "gradient_clipping": 1.0, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                                "stage3_param_persistence_threshold": 1e6}}
    engine, *_ = initialize(model, ds, groups)
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    ids = torch.randint(0, 151936, (1, args.seq), device="cuda", generator=g)
    losses, norms, times = [], [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.time()
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.time() - t0)
        loss = out.loss.detach().float()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        norms.append(float(engine.get_global_grad_norm()))
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {"gpu": torch.cuda.get_device_name(), "world": world, "ep": args.ep, "layers": args.layers,
                  "seq": args.seq, "backend": model.moe_blocks()[0].experts.backend,
                  "peak_mem_gib_max_rank": round(peak.item(), 2), "median_step_s": round(statistics.median(times[2:]), 3),
                  "losses": [round(x, 4) for x in losses], "grad_norms": [round(x, 4) for x in norms]}
        print("RESULT", json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()  # rank 0 leaving first would make the others' NCCL heartbeat report a dead store


if __name__ == "__main__":
    main()
