"""Pretrain (or continue pretraining) an MoE model of any registered family (framework/models/registry.py) on DeepSpeed.

    deepspeed [--hostfile H] [--num_gpus N] launch/pretrain.py [--config X.yaml] [--deepspeed Y.json]
              [--resume auto|CHECKPOINT] [section.key=value ...]
    python launch/pretrain.py --hostfile H [--num_gpus N] ...   # checks hostfile and config, then runs the line above
    python launch/pretrain.py                                   # the demo: model_configs/demo.yaml on this machine

Configuration errors stop every process before any work, with one line naming the file, key and fix (exit code 2).
A training loss that turns nan/inf stops every process at the next log or save, before anything is saved (exit code 1;
train.stop_on_nonfinite_loss); so does a checkpoint that would not fit on the disk, or whose writing fails (exit code 1,
the previous checkpoint stays the latest). A second run into an output directory in use, a fresh run into one that
holds checkpoints, or a damaged checkpoint to resume from stops before training with one line (exit code 2).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

DEMO_CONFIG = os.path.join(REPO, "model_configs", "demo.yaml")


def parse_args(argv: list[str], doc: str | None = None, demo_config: str = DEMO_CONFIG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (default: the demo, "
                        f"{os.path.relpath(demo_config, REPO)})")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON whose ZeRO/communication settings override the defaults")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in train.output_dir) or a checkpoint directory")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by DeepSpeed's launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 parallel.ep_size=4")
    return parser.parse_args(argv)


def launch_world(argv: list[str]) -> tuple[int, str | None]:
    """(processes, where they come from) for a validated launch (`--hostfile H [--num_nodes N] [--num_gpus G]`), the
    description (e.g. `2 hosts x 8 GPUs, H lines 1, 2`) for the plan's messages. A missing or bad hostfile and a
    host selection it cannot satisfy stop here, with the line prelaunch would print, before any config check."""
    from framework.cluster import parse_hostfile, split_launcher_args  # noqa: PLC0415
    from framework.cluster.world import describe_world, select_gpus  # noqa: PLC0415

    opts, _ = split_launcher_args(argv)
    path = str(opts["--hostfile"])
    hosts = parse_hostfile(path)
    errors: list[str] = []
    gpus = select_gpus(hosts, opts.get("--num_gpus"), opts.get("--num_nodes"), path, errors)
    if errors:
        raise ValueError("\n".join(errors))
    return sum(gpus.values()), describe_world(hosts, gpus, path)


def main(argv: list[str] | None = None, task: str = "pretrain", script: str = __file__,
         demo_config: str = DEMO_CONFIG, doc: str | None = None, gc_paused: bool = False) -> int:
    """The run of `task` ("pretrain", or "finetune" from launch/finetune.py: the same run on chat data); `script`:
    the entry point a validated multi-node launch starts on every host; `demo_config`: the run with no --config; `doc`:
    its --help text; `gc_paused`: the entry point turned cyclic garbage collection off for the imports (main turns it
    back on before the model is built)."""
    argv = sys.argv[1:] if argv is None else argv
    from framework.cluster import prelaunch, split_launcher_args, wants_prelaunch  # noqa: PLC0415
    from framework.config import ConfigError, load_run_config  # noqa: PLC0415
    from framework.config.plan import check_output_dir, resolve_plan  # noqa: PLC0415
    from framework.train.errors import (CheckpointError, CheckpointSaveFailed, DiskFull,  # noqa: PLC0415
                                        NonFiniteLoss)
    from framework.train.run_lock import acquire_run_lock  # noqa: PLC0415

    script = os.path.abspath(script)
    launch_by_hand = wants_prelaunch([script, *argv])
    rank0 = os.environ.get("RANK", "0") == "0"
    run_lock = None
    started = False  # the trainer exists: from then on the output directory holds the run's files
    try:
        # `python launch/pretrain.py --hostfile H ...`: the launcher options are ours to check, then DeepSpeed's.
        args = parse_args(split_launcher_args(argv)[1] if launch_by_hand else argv, doc, demo_config)
        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        config_path = args.config or demo_config
        cfg = load_run_config(config_path, overrides)
        world, world_desc = launch_world(argv) if launch_by_hand else (int(os.environ.get("WORLD_SIZE", "1")), None)
        if rank0 and not launch_by_hand:
            # One run per output directory, decided before its checkpoints are looked at and before any process
            # group exists: the other ranks of a refused run are stopped by the launcher when rank 0 exits. Held
            # until this process ends (the OS releases it on a crash).
            check_output_dir(cfg.train.output_dir)
            run_lock = acquire_run_lock(cfg.train.output_dir)
        # every check that needs the config, the world, the model and the checkpoint, before any process starts.
        # The corpus is scanned once per machine, by the launched local rank 0 (the launcher stops the others when
        # it fails), not by the validated launch: the launching host need not see the data, and writes nothing.
        scan = not launch_by_hand and os.environ.get("LOCAL_RANK", "0") == "0"
        plan = resolve_plan(cfg, world, check_corpus=scan, world_desc=world_desc, task=task)
        from framework.config.deepspeed import build_ds_config, read_ds_json  # noqa: PLC0415

        ds_user = read_ds_json(args.deepspeed) if args.deepspeed else None
        # the whole DeepSpeed JSON checked against the YAML now, before any process group or model exists
        build_ds_config(plan.cfg, world, True, ds_user, args.deepspeed or "DeepSpeed config")
        if launch_by_hand:
            command = prelaunch([script, *argv], plan.cfg.parallel.ep_size)
            print("launching: " + " ".join(command), flush=True)
            os.execvp(command[0], command)
        from framework.train.trainer import Trainer  # noqa: PLC0415

        if gc_paused:
            # The imports (torch, DeepSpeed, transformers) made ~400k long-lived objects and no garbage: frozen, no
            # later collection walks them again. Collection is on again before the model and engine exist, so their
            # temporaries (and the memory they hold) are freed as before.
            gc.freeze()
            gc.enable()

        if rank0 and not args.config:
            print(f"no --config given: running the demo ({os.path.relpath(demo_config)})", flush=True)
        started = True
        trainer = Trainer(plan, ds_user, args.deepspeed or "DeepSpeed config")
        trainer.train()
    except (ConfigError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (NonFiniteLoss, DiskFull, CheckpointSaveFailed) as e:  # every rank raises it at the same step
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, RuntimeError) as e:
        if not launch_by_hand:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)  # hostfile / world-size problems, one line each
        return 2
    finally:
        if run_lock is not None:
            run_lock.release(discard=not started)
    return 0


if __name__ == "__main__":
    gc.disable()  # collections during the imports only walk what they allocate (~0.6 s of a rank's start-up)
    from framework.cluster.process_exit import exit_without_teardown  # noqa: PLC0415

    exit_without_teardown(main(gc_paused=True))
