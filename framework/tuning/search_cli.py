"""`python tools/tune_zero.py search`: arguments, the estimate-based skip, and the printed table.

    python tools/tune_zero.py search --config model_configs/X.yaml --num_gpus N [--hostfile H] [--out DIR]
        [--micro_batch_sizes 1,2,4] [--zero_stages 2,3] [--ep_sizes 1,4] [--bucket_scales 0.5,1,2]
        [--activation_checkpointing on,moe,off] [--ep_chunks 1,2] [--offload off,on] [--steps 8] [--warmup 3] [--gpu_memory_gb 80]
        [section.key=value ...]

Every trial is a short real run of launch/pretrain.py (same launcher, same code as training) recorded in
OUT/trials.csv as it finishes; rerunning the same command skips recorded trials. The best trial's DeepSpeed JSON is
written to OUT/best_ds_config.json and the YAML overrides it needs to OUT/best_overrides.txt.
"""

from __future__ import annotations

import argparse
import csv
import os

from framework.tuning.search import Trial, grid, python_launcher, run_search, trial_ds_config


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _switches(text: str) -> list[bool]:
    values = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    try:
        return [values[x.lower()] for x in text.split(",") if x]
    except KeyError as e:
        raise argparse.ArgumentTypeError(f"expected on/off values, found {e.args[0]!r}") from None


def _checkpointing_modes(text: str) -> list[bool | str]:
    values = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False, "moe": "moe",
              "attention": "attention"}
    try:
        return [values[x.lower()] for x in text.split(",") if x]
    except KeyError as e:
        raise argparse.ArgumentTypeError(f"expected on/off/moe/attention values, found {e.args[0]!r}") from None


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run YAML")
    p.add_argument("--num_gpus", type=int, help="GPUs per node (DeepSpeed's --num_gpus)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node trials")
    p.add_argument("--master_port", type=int, default=29650)
    p.add_argument("--out", default="zero_search", help="results folder (resumable)")
    p.add_argument("--micro_batch_sizes", type=_ints, default=[1])
    p.add_argument("--zero_stages", type=_ints, default=[3])
    p.add_argument("--ep_sizes", type=_ints, help="default: the YAML's parallel.ep_size")
    p.add_argument("--bucket_scales", type=_floats, default=[1.0], help="x the auto bucket (one layer's experts)")
    # default on,moe: recomputing only the MoE half ran 4% faster than whole layers at micro batch 1 on an H200
    # (PERF_NOTES change 12) but keeps more activations; each trial that fits is measured and the faster one wins
    p.add_argument("--activation_checkpointing", type=_checkpointing_modes, default=[True, "moe"],
                   help="comma-separated: on (whole layers), moe, attention (that half of each layer), off "
                        "(default: on,moe)")
    # default 1,2: whether pipelining the all-to-alls in 2 token chunks pays depends on the interconnect and on the
    # rows per expert (PERF_NOTES change 16); trials with EP measure both (without EP it changes nothing: not run)
    p.add_argument("--ep_chunks", type=_ints, default=[1, 2],
                   help="comma-separated parallel.ep_chunks values for trials with ep_size > 1 (default: 1,2)")
    p.add_argument("--offload", type=_switches, default=[False])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput median")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="skip trials the estimate puts above this")
    p.add_argument("overrides", nargs="*", help="section.key=value for every trial (e.g. data.paths=[...])")


def run_search_command(args: argparse.Namespace) -> int:
    from framework.config import load_run_config  # noqa: PLC0415
    from framework.config.deepspeed import auto_sizes  # noqa: PLC0415
    from framework.config.load import ConfigError  # noqa: PLC0415
    from framework.config.plan import (  # noqa: PLC0415
        accumulation_steps, check_model_parallel, global_batch, resolve_model)
    from framework.tuning.estimate import estimate_memory  # noqa: PLC0415

    from framework.models.attention import resolve_attention  # noqa: PLC0415

    cfg = load_run_config(args.config, args.overrides)
    _, hf_config = resolve_model(cfg)  # the family's checked config, as the trainer gets it
    # the trials run on the GPU machine: "auto" there means flash varlen (no S x S mask)
    attention = "varlen" if cfg.model.attn_implementation == "auto" else resolve_attention(cfg.model.attn_implementation)
    world = args.num_gpus or 1
    if args.hostfile:
        from framework.cluster import parse_hostfile  # noqa: PLC0415
        from framework.cluster.world import select_gpus  # noqa: PLC0415

        # the processes DeepSpeed's runner will start for the trials: --num_gpus on every host, never fewer
        errors: list[str] = []
        gpus = select_gpus(parse_hostfile(args.hostfile), args.num_gpus, None, args.hostfile, errors)
        if errors:
            raise ConfigError(errors[0])
        world = sum(gpus.values())
    trials = grid(args.micro_batch_sizes, args.zero_stages, args.ep_sizes or [cfg.parallel.ep_size],
                  args.bucket_scales, args.activation_checkpointing, args.offload, args.ep_chunks)

    def fits(trial: Trial) -> tuple[bool, float | None, str]:
        # the run plan's own checks, so a trial is skipped exactly when its real run would stop on the config
        train = cfg.train.model_copy(update={"micro_batch_size": trial.micro_batch_size})
        try:
            check_model_parallel(trial.ep_size, world, hf_config)
            accumulation_steps(global_batch(cfg.model_copy(update={"train": train}), world)[0],
                               trial.micro_batch_size, world)
        except ConfigError as e:
            return False, None, str(e)
        ds = trial_ds_config(trial, *auto(trial.ep_size))
        est = estimate_memory(hf_config, world, trial.ep_size, trial.zero_stage, trial.micro_batch_size,
                              cfg.data.seq_len, trial.activation_checkpointing, trial.offload,
                              ds if trial.zero_stage in (1, 2, 3) else None, attention, cfg.train.loss_chunk_tokens,
                              cfg.moe.z_loss_coef > 0)
        gib = est.total_gib
        return (est.fits(args.gpu_memory_gb), gib, f"estimate {gib:.1f} GiB > usable part of {args.gpu_memory_gb:g}")

    def auto(ep_size: int) -> tuple[int, int]:
        sizes = auto_sizes(hf_config, ep_size)
        return sizes["bucket"], sizes["persistence"]

    launcher = python_launcher(args.num_gpus, args.hostfile, args.master_port)
    best = run_search(os.path.abspath(args.config), os.path.abspath(args.out), trials, launcher, args.overrides,
                      args.steps, args.warmup, auto, fits)
    with open(os.path.join(args.out, "trials.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"\n{'trial':<30}{'status':>9}{'tok/s/GPU':>12}{'TFLOP/s':>9}{'mem GB':>8}{'est GB':>8}")
    for r in rows:
        print(f"{r['trial']:<30}{r['status']:>9}{r['tokens_per_s_per_gpu'] or '-':>12}{r['tflops_per_gpu'] or '-':>9}"
              f"{r['mem_gb'] or '-':>8}{r['estimate_gb'] or '-':>8}")
    if best is None:
        print("no trial finished; see the logs under", os.path.join(args.out, "trials"))
        return 1
    print(f"best: {best['trial']} ({best['tokens_per_s_per_gpu']} tokens/s/GPU) -> "
          f"{os.path.join(args.out, 'best_ds_config.json')} with {open(os.path.join(args.out, 'best_overrides.txt')).read().strip()}")
    return 0
