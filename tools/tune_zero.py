#!/usr/bin/env python
"""ZeRO / expert-parallel tuning for a run config.

    python tools/tune_zero.py estimate --config model_configs/qwen3-30b-a3b.yaml --num_gpus 16 [--ep_size 8]
        [--zero_stage 3] [--offload] [--micro_batch_size 1] [--seq_len 4096]
        [--activation_checkpointing on|off|moe|attention] [--attention auto|varlen|sdpa|eager] [--deepspeed my.json]
        [--gpu_memory_gb 80] [--gpus_per_node 8]
        [section.key=value ...]
    python tools/tune_zero.py time --config model_configs/qwen3-30b-a3b.yaml [--nodes 2 4 8] [--gpus_per_node 8]
        [--ep_size 8] [--compute_tflops T] [--intra_gbs 200] [--inter_gbs 45] [--a2a_hidden 0] [--zero_hidden 0]

estimate: per-GPU memory of parameters, gradients, optimizer states, activations (with and without activation
checkpointing), communication / prefetch buffers and the total, at the loss backward, a layer's backward and the
optimizer step, and whether the peak fits the GPU (framework/tuning/estimate.py says what each term is). Unset flags
come from the config (parallel.ep_size, parallel.zero_stage, train.micro_batch_size, data.seq_len,
train.activation_checkpointing, model.attn_implementation); the DeepSpeed settings are the ones launch/pretrain.py
would use (framework/config/deepspeed.py), with --deepspeed JSON on top as in a run. No GPU needed.

time: per-step time of ZeRO-2 + EP and ZeRO-3 + EP plans on each node count (framework/tuning/step_time.py): the
compute one GPU measured, the expert all-to-all inside a node and ZeRO's traffic inside or across nodes, with the
memory estimate beside each plan and which stage is faster where both fit.

Errors (a bad flag, config key or combination) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from framework.checkpoint.cli import UserError, run_cli  # noqa: E402
from framework.tuning.search_cli import add_search_args, run_search_command  # noqa: E402

PROG = "tune_zero"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through run_cli instead of usage + message
        command = self.prog.split()[-1]
        raise UserError(message if command == PROG else f"{command}: {message}")


# ---- estimate -------------------------------------------------------------------------------------------------------
def add_estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (model_configs/*.yaml)")
    p.add_argument("--num_gpus", type=int, required=True, help="GPUs (processes) of the run, over all nodes")
    p.add_argument("--ep_size", type=int, help="expert-parallel size (default parallel.ep_size)")
    p.add_argument("--zero_stage", type=int, help="ZeRO stage 0-3 (default parallel.zero_stage)")
    p.add_argument("--offload", action="store_true", help="optimizer states and fp32 master weights on the CPU")
    p.add_argument("--micro_batch_size", type=int, help="sequences per GPU (default train.micro_batch_size)")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default data.seq_len)")
    p.add_argument("--activation_checkpointing", choices=("on", "off", "moe", "attention"),
                   help="default train.activation_checkpointing (on: whole layers; moe, attention: that half)")
    p.add_argument("--attention", choices=("auto", "varlen", "sdpa", "eager"),
                   help="default model.attn_implementation; auto = varlen where torch has it, as on the GPUs")
    p.add_argument("--deepspeed", help="DeepSpeed JSON with ZeRO settings, as given to launch/pretrain.py")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80, H100)")
    p.add_argument("--gpus_per_node", type=int, help="for CPU memory per node with --offload (default min(N, 8))")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. model.num_layers=8")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags as config overrides (applied after the positional ones, so a flag wins), each checked first so that
    the error names the flag."""
    for flag in ("num_gpus", "micro_batch_size", "seq_len", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be >= 1")
    if args.gpu_memory_gb <= 0:
        raise UserError(f"--gpu_memory_gb {args.gpu_memory_gb:g}: must be > 0")
    if args.zero_stage is not None and args.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage {args.zero_stage}: unknown ZeRO stage; expected 0, 1, 2 or 3")
    return _as_overrides({"parallel.ep_size": args.ep_size, "parallel.zero_stage": args.zero_stage,
                          "train.micro_batch_size": args.micro_batch_size, "data.seq_len": args.seq_len,
                          "train.activation_checkpointing": _checkpointing(args.activation_checkpointing)})


def _checkpointing(choice: str | None) -> bool | str | None:
    """--activation_checkpointing on|off|moe|attention as train.activation_checkpointing's value."""
    return {"on": True, "off": False}.get(choice, choice)


def _as_overrides(values: dict[str, object]) -> list[str]:
    """section.key=value overrides of the values that are set (YAML spelling of booleans)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items() if v is not None]


def _attention(name: str) -> str:
    """What a GPU run resolves "auto" to (framework/models/attention.py): varlen where torch has it."""
    if name != "auto":
        return name
    return "varlen" if importlib.util.find_spec("torch.nn.attention.varlen") is not None else "sdpa"


def run_estimate(args: argparse.Namespace) -> int:
    from framework.config import load_run_config  # noqa: PLC0415
    from framework.config.deepspeed import read_ds_json  # noqa: PLC0415
    from framework.config.plan import check_model_parallel, resolve_model  # noqa: PLC0415
    from framework.tuning.report import format_report  # noqa: PLC0415

    cfg = load_run_config(args.config, list(args.overrides) + _flag_overrides(args))
    n = args.num_gpus
    if args.offload and cfg.parallel.zero_stage == 0:
        raise UserError("--offload needs parallel.zero_stage 1, 2 or 3 (ZeRO-0 has no optimizer partitions)")
    _, hf_config = resolve_model(cfg)  # the family's checked config, as the trainer gets it
    check_model_parallel(cfg.parallel.ep_size, n, hf_config)
    user = read_ds_json(args.deepspeed) if args.deepspeed else {}
    if args.offload:
        zero = dict(user.get("zero_optimization", {}))
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        user = {**user, "zero_optimization": zero}
    est, notes = _config_estimate(cfg, hf_config, n, user, args.deepspeed or "DeepSpeed config", args.attention)
    print("\n".join([f"config    {args.config}", *notes, format_report(est, args.gpu_memory_gb, args.gpus_per_node)]))
    return 0


def _config_estimate(cfg, hf_config, num_gpus: int, user_ds: dict, ds_name: str, attention: str | None):
    """(the memory estimate of run config `cfg` on `num_gpus` GPUs with the DeepSpeed JSON a run would get, notes
    for the report): the one estimate behind `estimate` and `time`."""
    from framework.config.deepspeed import build_ds_config  # noqa: PLC0415
    from framework.tuning.estimate import estimate_memory  # noqa: PLC0415

    notes = []
    per_step = cfg.train.micro_batch_size * num_gpus
    if cfg.train.global_batch_size % per_step:  # memory does not depend on gradient accumulation
        notes.append(f"note: train.global_batch_size ({cfg.train.global_batch_size}) does not divide over {num_gpus} "
                     f"GPUs x micro batch {cfg.train.micro_batch_size}; estimated with {per_step} (memory does not "
                     "depend on it)")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": per_step})})
    ds = build_ds_config(cfg, num_gpus, True, user_ds, ds_name, hf_config=hf_config)
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    est = estimate_memory(hf_config, num_gpus, cfg.parallel.ep_size, cfg.parallel.zero_stage,
                          cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.activation_checkpointing, offload,
                          ds, _attention(attention or cfg.model.attn_implementation), cfg.train.loss_chunk_tokens,
                          cfg.moe.z_loss_coef > 0)
    return est, notes


# ---- time -----------------------------------------------------------------------------------------------------------
# One-GPU model TFLOP/s at Qwen3-30B-A3B widths, seq 4096, ZeRO-3, on an H100 (benchmarks/PERF_NOTES.md session 13,
# `benchmarks/e2e.py --repeats 3` medians), keyed by (micro batch, activation checkpointing): --compute_tflops's
# default where the plan matches one of them.
ONE_GPU_TFLOPS = {(1, True): 138.5, (4, False): 344.0}
# Per-GPU bus bandwidths, GB/s: the 4x H200 profile of session 4 moved ~5.9 GB of all-to-all per rank in 16-32 ms
# (180-370 GB/s); across nodes, a 400 Gb/s NIC per GPU at ~90%. Assumed, not measured on a multi-node run: measure
# your cluster's with benchmarks/collectives.py, which prints the two flags.
INTRA_GBS, INTER_GBS = 200.0, 45.0


def add_time_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (model_configs/*.yaml)")
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8], help="node counts to compare (default 2 4 8)")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--ep_size", type=int, help="expert-parallel size inside a node (default: GPUs per node)")
    p.add_argument("--zero_stages", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--micro_batch_size", type=int, help="sequences per GPU (default train.micro_batch_size)")
    p.add_argument("--seq_len", type=int, help="tokens per sequence (default data.seq_len)")
    p.add_argument("--activation_checkpointing", choices=("on", "off", "moe", "attention"),
                   help="default train.activation_checkpointing")
    p.add_argument("--compute_tflops", type=float,
                   help="model TFLOP/s of one GPU on this micro batch and checkpointing (benchmarks/e2e.py "
                        "--num_gpus 1); default: our H100 figure where one matches (mbs 1 with checkpointing, mbs 4 "
                        "without)")
    p.add_argument("--intra_gbs", type=float, default=INTRA_GBS,
                   help="per-GPU bus bandwidth inside a node, GB/s (benchmarks/collectives.py measures it)")
    p.add_argument("--inter_gbs", type=float, default=INTER_GBS,
                   help="per-GPU bus bandwidth across nodes, GB/s (benchmarks/collectives.py measures it)")
    p.add_argument("--a2a_hidden", type=float, default=0.0, help="share of the all-to-all hidden behind compute")
    p.add_argument("--zero_hidden", type=float, default=0.0, help="share of ZeRO's traffic hidden behind compute")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")


def _nodes(count: int) -> str:
    return f"{count} node" + ("s" if count > 1 else "")


def run_time(args: argparse.Namespace) -> int:
    from framework.config import load_run_config  # noqa: PLC0415
    from framework.config.plan import resolve_model  # noqa: PLC0415
    from framework.models.registry import moe_shape  # noqa: PLC0415
    from framework.train.flops import flops_per_token  # noqa: PLC0415
    from framework.tuning.params import model_shape, param_inventory  # noqa: PLC0415
    from framework.tuning.step_time import Plan, Rates, step_time  # noqa: PLC0415

    for flag in ("gpus_per_node", "ep_size", "micro_batch_size", "seq_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if any(n < 1 for n in args.nodes):
        raise UserError(f"--nodes {args.nodes}: every node count must be >= 1")
    for flag in ("a2a_hidden", "zero_hidden"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag):g}: a share, expected 0 <= x < 1")
    for flag in ("intra_gbs", "inter_gbs", "gpu_memory_gb"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} {getattr(args, flag):g}: must be > 0")
    ep = args.ep_size or args.gpus_per_node
    if ep > args.gpus_per_node or args.gpus_per_node % ep:
        raise UserError(f"--ep_size {ep}: must divide --gpus_per_node {args.gpus_per_node} (the model keeps the "
                        "expert all-to-all inside a node)")
    overrides = list(args.overrides) + _as_overrides({
        "parallel.ep_size": ep, "train.micro_batch_size": args.micro_batch_size, "data.seq_len": args.seq_len,
        "train.activation_checkpointing": _checkpointing(args.activation_checkpointing)})
    configs = {stage: load_run_config(args.config, overrides + [f"parallel.zero_stage={stage}"])
               for stage in args.zero_stages}  # the DeepSpeed JSON a run would get depends on the stage
    cfg = configs[args.zero_stages[0]]
    _, hf_config = resolve_model(cfg)
    mbs, seq, ac = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.activation_checkpointing
    compute = args.compute_tflops or ONE_GPU_TFLOPS.get((mbs, ac))
    if compute is None or compute <= 0:
        raise UserError(f"--compute_tflops: no measured one-GPU rate for micro batch {mbs} with activation "
                        f"checkpointing {ac}; measure it with benchmarks/e2e.py --num_gpus 1 and pass it")
    rates = Rates(compute, args.intra_gbs, args.inter_gbs, args.a2a_hidden, args.zero_hidden)
    shape = model_shape(hf_config)
    _, num_experts, top_k, _ = moe_shape(hf_config)
    params = param_inventory(hf_config)
    per_token = flops_per_token(hf_config, seq)
    lines = [f"config    {args.config}: {shape.num_layers} layers ({shape.num_moe_layers} MoE, {num_experts} experts, "
             f"top-{top_k}), micro batch {mbs} x {seq}, activation checkpointing {ac}",
             f"rates     compute {compute:g} TFLOP/s/GPU (one GPU), all-to-all {args.intra_gbs:g} GB/s in a node, "
             f"collectives across nodes {args.inter_gbs:g} GB/s; hidden: all-to-all {args.a2a_hidden:.0%}, ZeRO "
             f"{args.zero_hidden:.0%}",
             f"{'nodes':>5} {'GPUs':>5}  {'plan':<12}{'memory':<24}{'compute':>9}{'all-to-all':>11}{'ZeRO':>8}"
             f"{'step ms':>9}{'TFLOP/s/GPU':>13}{'tokens/s/GPU':>14}"]
    for nodes in args.nodes:
        world = nodes * args.gpus_per_node
        micro_steps = max(cfg.train.global_batch_size // (mbs * world), 1)
        tokens = micro_steps * mbs * seq
        steps = {}
        for stage in args.zero_stages:
            plan = Plan(nodes, args.gpus_per_node, ep, stage, mbs, seq, micro_steps, ac)
            t = step_time(plan, rates, per_token, shape.hidden, shape.num_moe_layers, num_experts, top_k, params)
            est, _ = _config_estimate(configs[stage], hf_config, world, {}, "DeepSpeed config", None)
            need, fits = est.total_gib, est.fits(args.gpu_memory_gb)
            if fits:
                steps[stage] = t.total
            lines.append(f"{nodes:>5} {world:>5}  {f'ZeRO-{stage} EP{ep}':<12}"
                         f"{f'{need:.1f} GiB' + ('' if fits else ' (does not fit)'):<24}"
                         f"{1e3 * t.compute / micro_steps:>9.1f}{1e3 * t.all_to_all / micro_steps:>11.1f}"
                         f"{1e3 * t.zero / micro_steps:>8.1f}{1e3 * t.total / micro_steps:>9.1f}"
                         f"{per_token * tokens / t.total / 1e12:>13.1f}{tokens / t.total:>14.0f}")
        if len(steps) == 2:
            fast, slow = sorted(steps, key=steps.get)
            lines.append(f"      -> {_nodes(nodes)}: ZeRO-{fast}+EP is {steps[slow] / steps[fast]:.2f}x as fast as "
                         f"ZeRO-{slow}+EP")
        elif len(args.zero_stages) == 2:
            lines.append(f"      -> {_nodes(nodes)}: " + (f"only ZeRO-{next(iter(steps))} fits" if steps
                                                      else "neither fits"))
    lines.append("(ms per micro step; model FLOPs as framework/train/flops.py counts them; framework/tuning/"
                 "step_time.py says what is and is not modelled)")
    print("\n".join(lines))
    return 0


# ---- commands -------------------------------------------------------------------------------------------------------
# name -> (add its arguments, run it, help).
COMMANDS = {
    "estimate": (add_estimate_args, run_estimate, "per-GPU memory estimate of a run config (no GPU needed)"),
    "time": (add_time_args, run_time, "per-step time of ZeRO-2/3 + EP plans on several nodes, from measured rates"),
    "search": (add_search_args, run_search_command,
               "measured trials over micro batch, ZeRO stage, EP size, buckets, checkpointing and offload"),
}


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
