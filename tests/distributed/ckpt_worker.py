"""One rank of the checkpoint save/resume runs (started by test_train_checkpoint.py with RANK/WORLD_SIZE/MASTER_* set).

    python tests/distributed/ckpt_worker.py OUT_DIR PHASE CASE [CASE ...] [+ OUT_DIR PHASE CASE [CASE ...] ...]
    CASE = z{stage}ep{ep}[bf16|bf16acc32][tied][-family]

Each '+'-separated group runs as if launched alone, one group after another in the same processes (a launch costs ~5 s
of start-up on a 2-core CPU machine); "previous case" below is the previous case of the same group.

PHASE "train", per case: (a) a fresh engine runs STEPS steps uninterrupted; (b) another fresh engine runs SAVE_AT
steps, saves to OUT_DIR/CASE/step{SAVE_AT}.partial, which rank 0 renames to step{SAVE_AT} after adding config.json and
a tokenizer folder (as the trainer does), records the full fp32 parameters at that point, then keeps training to STEPS
(a save must not disturb the run).
PHASE "resume", per case: a fresh engine first tries to load the previous case's checkpoint (another ZeRO stage or EP
size: must fail with one line, before touching anything), then loads its own and runs the remaining steps.
PHASE "both": train then resume in one process (new engines; a ZeRO-3 engine cannot load right after it saved).
Rank 0 writes OUT_DIR/CASE/{train,resume}.pt with losses, learning rates and full fp32 parameters; every rank's output
goes to OUT_DIR/rank{r}.log.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import traceback

if __name__ == "__main__":
    # The imports below (torch and what the framework pulls in) allocate ~400k long-lived objects and no garbage:
    # collecting while they load only walks them again and again (~0.4 s of each rank's start-up).
    gc.disable()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

import framework  # noqa: E402
from framework.checkpoint.engine_state import load_engine_checkpoint, save_engine_checkpoint  # noqa: E402
from framework.cluster.process_group import init_deepspeed_distributed  # noqa: E402
from framework.models.registry import family_for, moe_shape  # noqa: E402
from framework.parallel.expert_parallel import expert_placement  # noqa: E402
from framework.parallel.groups import init_parallel_groups  # noqa: E402
from framework.zero.engine import initialize  # noqa: E402
from framework.zero.reshard import ensure_adam_states  # noqa: E402
from tests.distributed import common  # noqa: E402
from tests.distributed.common import LR, MICRO, model_config  # noqa: E402
from tests.distributed.ep_worker import full_tensors  # noqa: E402
from tests.distributed.launch import split_runs  # noqa: E402
from framework.cluster.process_exit import exit_without_teardown  # noqa: E402

if __name__ == "__main__":
    # frozen, the import-time objects are skipped by every later collection; collection is back on for the
    # runs themselves
    gc.freeze()
    gc.enable()

STEPS, SAVE_AT = 4, 2
TAG = f"step{SAVE_AT}"


def parse_case(case: str) -> tuple[int, int, str, bool, str | None]:
    """z{stage}ep{ep}[bf16 | bf16acc32][tied][-family] -> ZeRO stage, EP size, dtype (bf16acc32: bf16 weights with fp32
    gradient accumulation, which DeepSpeed runs on its BF16_Optimizer under ZeRO-1), tied word embeddings, the model
    family (tests/family_cases.py; none: Qwen3-MoE's TINY)."""
    m = re.fullmatch(r"z(\d)ep(\d+)(bf16|bf16acc32)?(tied)?(?:-(\w+))?", case)
    return int(m[1]), int(m[2]), m[3] or "fp32", bool(m[4]), m[5]


def ds_config(stage: int, world: int, dtype: str = "fp32") -> dict:
    """The EP parity runs' config plus a warm-up schedule (so the lr changes every step) and the run's precision."""
    config = common.ds_config(stage, world)
    if stage == 3:
        # norms (32 elements) stay persistent, matrices are partitioned: both kinds go through the checkpoint
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": LR / 4, "warmup_max_lr": LR,
                                                          "warmup_num_steps": 3, "warmup_type": "linear"}}
    config["bf16"] = {"enabled": dtype != "fp32"}
    if dtype == "bf16acc32":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def batch(step: int, world: int, seq: int = 12, vocab_size: int = model_config()["vocab_size"]):
    """A different fixed global batch for every step (so that resuming at the wrong step would show)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab_size, (world * MICRO, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -(step + 1):] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def build(case: str):
    stage, ep, dtype, tied, family = parse_case(case)
    config = model_config(tied, family)
    groups = init_parallel_groups(ep, moe_shape(family_for(config).load_config(config))[1])
    model = framework.load_model(config, backend="grouped_mm", attn_implementation="eager", seed=0,
                                 dtype=torch.float32 if dtype == "fp32" else torch.bfloat16,
                                 placement=expert_placement(groups, stage))
    engine, *_ = initialize(model, ds_config(stage, dist.get_world_size(), dtype), groups)
    return engine, groups, model.config


def train_steps(engine, first: int, last: int, record: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(first, last):
        ids, mask, labels = batch(step, world, vocab_size=engine.module.config.vocab_size)
        sl = slice(rank * MICRO, (rank + 1) * MICRO)
        record["lrs"].append(engine.get_lr()[0])
        out = engine(ids[sl], attention_mask=mask[sl], labels=labels[sl])
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        record["losses"].append(loss.item() / world)


def fp32_params(engine, groups) -> dict[str, torch.Tensor]:
    return full_tensors(engine, groups, safe_get_full_fp32_param)


def adam_moments(engine, groups) -> dict[str, torch.Tensor]:
    ensure_adam_states(engine)  # links ZeRO-1/2's expert fragments to their states (see its docstring)
    return {f"{name}:{key}": t for key in ("exp_avg", "exp_avg_sq")
            for name, t in full_tensors(engine, groups, lambda p: safe_get_full_optimizer_state(p, key)).items()}


def module_params(engine, groups) -> dict[str, torch.Tensor]:
    """The weights the forward pass uses (gathered under ZeRO-3), as fp32."""
    def read(p):
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().clone()
        return p.detach()

    return full_tensors(engine, groups, read)


def save(case_dir: str, rank: int, result: dict) -> None:
    if rank == 0:
        torch.save(result, os.path.join(case_dir, f"{result['phase']}.pt"))


def train(case: str, out_dir: str) -> None:
    rank = dist.get_rank()
    case_dir = os.path.join(out_dir, case)
    os.makedirs(case_dir, exist_ok=True)
    result = {"phase": "train", "full": {"losses": [], "lrs": []}, "saved": {"losses": [], "lrs": []}}

    engine, groups, _ = build(case)
    result["initial"] = fp32_params(engine, groups)
    train_steps(engine, 0, STEPS, result["full"])
    result["full"]["params"] = fp32_params(engine, groups)
    engine.destroy()

    engine, groups, config = build(case)
    train_steps(engine, 0, SAVE_AT, result["saved"])
    result["at_save"] = fp32_params(engine, groups)
    result["at_save_module"] = module_params(engine, groups)
    result["at_save_moments"] = adam_moments(engine, groups)
    # saved under a temporary name and renamed, as the trainer does: nothing may depend on the tag directory's name
    client_state = {"step": SAVE_AT, "case": case, "data": [1, 2, 3]}
    save_engine_checkpoint(engine, groups, case_dir, f"{TAG}.partial", client_state)
    if rank == 0:  # what the trainer writes next to the engine state
        tag_dir = os.path.join(case_dir, f"{TAG}.partial")
        config.save_pretrained(tag_dir)
        os.makedirs(os.path.join(tag_dir, "tokenizer"), exist_ok=True)
        with open(os.path.join(tag_dir, "tokenizer", "tokenizer_config.json"), "w") as f:
            f.write('{"model_max_length": 64}\n')
        os.rename(tag_dir, os.path.join(case_dir, TAG))
        with open(os.path.join(case_dir, "latest"), "w") as f:
            f.write(TAG)
    dist.barrier()
    train_steps(engine, SAVE_AT, STEPS, result["saved"])
    result["saved"]["params"] = fp32_params(engine, groups)
    engine.destroy()
    save(case_dir, rank, result)


def resume(case: str, out_dir: str, wrong: str | None) -> None:
    rank = dist.get_rank()
    case_dir = os.path.join(out_dir, case)
    result = {"phase": "resume", "losses": [], "lrs": []}
    if wrong is not None:  # another case's checkpoint: another ZeRO stage / ep_size (resharded) or dtype (refused)
        # CKPT_CROSS_WORLD="DIR;case=source,...": this case loads DIR/source instead, saved at another world size
        cross_dir, _, pairs = os.environ.get("CKPT_CROSS_WORLD", "").partition(";")
        sources = dict(p.split("=") for p in pairs.split(",") if p)
        source_dir = os.path.join(cross_dir, sources[case]) if case in sources else os.path.join(out_dir, wrong)
        wrong = sources.get(case, wrong)
        engine, groups, _ = build(case)
        try:
            load_engine_checkpoint(engine, groups, source_dir, TAG, lr_scheduler=True)
            result["cross"] = {"from": wrong, "loaded": fp32_params(engine, groups),
                               "loaded_module": module_params(engine, groups),
                               "moments": adam_moments(engine, groups), "global_steps": engine.global_steps,
                               "lrs": [], "losses": []}
            train_steps(engine, SAVE_AT, STEPS, result["cross"])
        except ValueError as exc:
            result["cross"] = {"from": wrong, "error": str(exc)}
        engine.destroy()
    engine, groups, _ = build(case)
    client = load_engine_checkpoint(engine, groups, case_dir, TAG, lr_scheduler=True)
    result["client_state"] = client
    result["global_steps"] = engine.global_steps
    result["loaded_module"] = module_params(engine, groups)
    result["loaded"] = fp32_params(engine, groups)
    train_steps(engine, SAVE_AT, STEPS, result)
    result["params"] = fp32_params(engine, groups)
    engine.destroy()
    save(case_dir, rank, result)


def quiet_output(out_dir: str) -> int:
    """Send this process's stdout/stderr (DeepSpeed's and torch's warnings run to ~90 KB a rank) to a log file and
    return the original stdout's descriptor: run_workers drains the ranks' pipes one after the other, so a rank that
    fills its 64 KB pipe blocks while the rank being drained waits for it in a collective."""
    log = os.open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return saved


def main() -> None:
    groups = split_runs(sys.argv[1:])
    log_dir = groups[0][0]  # every group's output goes to the first group's rank logs
    for out_dir, *_ in groups:
        os.makedirs(out_dir, exist_ok=True)
    saved = quiet_output(log_dir)
    try:
        init_deepspeed_distributed("gloo")
        for out_dir, phase, *cases in groups:
            run(out_dir, phase, cases)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        with open(os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}.log"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 6000))
            os.write(saved, f.read())  # the end of the log (with the traceback) for run_workers' failure message
        raise


def run(out_dir: str, phase: str, cases: list[str]) -> None:
    if phase not in ("train", "resume", "both"):
        raise SystemExit(f"unknown phase {phase}")
    if phase in ("train", "both"):
        for case in cases:
            train(case, out_dir)
    if phase in ("resume", "both"):
        for i, case in enumerate(cases):
            resume(case, out_dir, wrong=cases[i - 1] if len(cases) > 1 else case)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
