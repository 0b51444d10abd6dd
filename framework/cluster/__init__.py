"""Multi-node launch: hostfile checks and the validated re-launch under DeepSpeed's runner.

Owns the launch checks that need the hostfile, before any training process exists: reading a DeepSpeed hostfile
(hostfile.py), the hosts and GPUs it gives and their expert-parallel layout over the nodes (world.py),
`.deepspeed_env` files (ds_env.py), and the `python launch/pretrain.py --hostfile H ...` form that checks all of that
(after the run plan, framework/config/plan.py) and then re-runs itself under
`deepspeed.launcher.runner` (prelaunch.py); also how a finished process leaves (process_exit.py). These modules import
neither torch nor deepspeed. See launch/MULTINODE.md.
"""

from framework.cluster.ds_env import check_deepspeed_env, deepspeed_env_files
from framework.cluster.hostfile import HostPool, parse_hostfile
from framework.cluster.prelaunch import (OPTIONS, PRELAUNCH_OPTIONS, REJECTED, is_under_launcher, prelaunch,
                                         runner_command, split_launcher_args, wants_prelaunch)
from framework.cluster.world import ALLOW_CROSS_NODE_EP, check_world, describe_world, select_gpus

__all__ = ["ALLOW_CROSS_NODE_EP", "OPTIONS", "PRELAUNCH_OPTIONS", "REJECTED", "HostPool", "check_deepspeed_env",
           "check_world", "deepspeed_env_files", "describe_world", "is_under_launcher", "parse_hostfile", "prelaunch",
           "runner_command", "select_gpus", "split_launcher_args", "wants_prelaunch"]
