"""The plain ZeRO-3 anchor for any registered family: stock DeepSpeed 0.19.8 + stock transformers, random tokens.

The shared anchor (shared/anchors/deepspeed_e2e.py) is fixed to Qwen3-30B-A3B widths; this is its "leaf" mode (plain
ZeRO-3, no expert parallelism, transformers' own MoE blocks with grouped_mm experts) extended to the model of any run
YAML (model.hf_config or model.path's config.json), at reduced depth. Same DeepSpeed settings, optimizer, steps and
timing as the shared anchor; the FLOPs per token are framework/train/flops.py's, the formula our rows use.

    python -m deepspeed.launcher.runner --num_gpus N benchmarks/anchor_family.py   # env below; one RESULT json line
Env: CONFIG (run YAML), LAYERS (4), SEQ (4096), MBS (1), GC (1 = activation checkpointing), EXPERTS_IMPL (grouped_mm),
     ADAM (torch = torch AdamW; fused = DeepSpeed FusedAdam).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DeepSpeed's JIT builder (FusedAdam) parses TORCH_CUDA_ARCH_LIST as numbers and fails on entries such as "9.0a".
if "TORCH_CUDA_ARCH_LIST" in os.environ:
    os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)a", r"\1", os.environ["TORCH_CUDA_ARCH_LIST"])

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from framework.config.load import load_run_config  # noqa: E402
from framework.config.plan import resolve_model  # noqa: E402
from framework.train.flops import flops_per_token  # noqa: E402


def main() -> None:
    layers, seq = int(os.environ.get("LAYERS", "4")), int(os.environ.get("SEQ", "4096"))
    mbs, adam = int(os.environ.get("MBS", "1")), os.environ.get("ADAM", "torch")
    deepspeed.init_distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    _, ours = resolve_model(load_run_config(os.environ["CONFIG"], [f"model.num_layers={layers}"]))
    fields = {k: v for k, v in ours.to_dict().items() if k != "model_type"}
    fields.update(num_hidden_layers=layers, max_position_embeddings=max(seq, ours.max_position_embeddings),
                  output_router_logits=True)
    cfg = AutoConfig.for_model(ours.model_type, **fields)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = os.environ.get("EXPERTS_IMPL", "grouped_mm")
    torch.manual_seed(0)
    with torch.device(f"cuda:{local}"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if os.environ.get("GC", "1") == "1":
        model.gradient_checkpointing_enable()
    ds = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "gradient_clipping": 1.0, "steps_per_print": 1000,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": adam == "torch"}},
          "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                                "stage3_param_persistence_threshold": 1e6}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds, model_parameters=list(model.parameters()))
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)

    def step() -> float:
        ids = torch.randint(0, cfg.vocab_size, (mbs, seq), device="cuda", generator=g)
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        return out.loss.item()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, n = time.time(), 6
    losses = [step() for _ in range(n)]
    torch.cuda.synchronize()
    dt = (time.time() - start) / n
    tps = mbs * seq / dt
    ours_reduced = type(ours).from_dict({**ours.to_dict(), "num_hidden_layers": layers})
    if rank == 0:
        print("RESULT", json.dumps({
            "mode": "leaf", "model_type": cfg.model_type, "layers": layers, "seq": seq, "mbs": mbs,
            "gc": os.environ.get("GC", "1"), "step_s": round(dt, 3), "tokens_per_s_per_gpu": round(tps),
            "model_tflops_per_gpu": round(tps * flops_per_token(ours_reduced, seq) / 1e12, 1), "adam": adam,
            "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "losses": [round(x, 3) for x in losses]}), flush=True)


if __name__ == "__main__":
    main()
