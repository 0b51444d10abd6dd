"""The validated multi-node launch: `python launch/pretrain.py --hostfile H ...` checks, then re-runs under DeepSpeed.

Owns: which command-line options belong to DeepSpeed's runner (an explicit table, `OPTIONS`), splitting them from the
script's own arguments, the checks that need the launcher options together with the hostfile, and the runner command
line. Does not own the hostfile grammar (hostfile.py), the host selection and node layout (world.py) or the config's
checks against the world size (framework/config/plan.py, resolved by launch/pretrain.py before prelaunch runs).

`deepspeed --hostfile H launch/pretrain.py ...` starts processes straight away, and DeepSpeed 0.19.8 given a missing
hostfile warns and trains on local GPUs only. Here every check runs first, in one process, and the errors name the
hostfile line; then the caller replaces itself (`os.execvp`) with

    [sys.executable, "-m", "deepspeed.launcher.runner", --hostfile=H, <runner options>, script, <script arguments>]

`--no_ssh --node_rank K` is the one-launch-per-node form (Kubernetes, or any cluster without ssh between nodes): each
node runs the same line with its own K, and the runner starts that node's processes only. PRELAUNCH_OPTIONS are read
here and passed to nobody. Runner options are passed as `--name=value` so that a value starting with `-`
(`--launcher_args=-x FOO`) survives argparse.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

from framework.cluster.ds_env import check_deepspeed_env, deepspeed_env_files
from framework.cluster.hostfile import HostPool, parse_hostfile
from framework.cluster.world import ALLOW_CROSS_NODE_EP, check_world, describe_world, select_gpus

# DeepSpeed 0.19.8's multi-node backends (deepspeed/launcher/constants.py); the runner lower-cases --launcher.
LAUNCHERS = ("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm")
# Backends whose validate_args rejects --num_nodes / --num_gpus (they always use every slot of the hostfile).
_WHOLE_HOSTFILE = ("openmpi", "mpich", "impi", "mvapich")
# Backends that refuse hosts with different slot counts (srun -n / mpirun -ppn place tasks evenly).
_EVEN_SLOTS = ("mpich", "impi", "mvapich", "slurm")
# Set in every process a launcher starts (deepspeed.launcher.launch and torchrun: LOCAL_RANK; OpenMPI, MVAPICH and
# hydra-based MPICH / Intel MPI: their own local rank). The slurm backend's srun tasks set none of these, but they
# receive the script arguments without --hostfile, so they never reach prelaunch.
_LAUNCHED_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class Option:
    """One runner option: the spellings accepted on our command line and the runner's name for it."""

    names: tuple[str, ...]
    runner: str
    kind: str  # "str", "int" or "flag"


# Our command line -> DeepSpeed's runner, in the order the runner command is written. Anything not listed here (and not
# in REJECTED) is the script's own argument and passes through unchanged, in order.
OPTIONS: tuple[Option, ...] = (
    Option(("--hostfile", "-H"), "--hostfile", "str"),
    Option(("--num_nodes",), "--num_nodes", "int"),
    Option(("--num_gpus", "--num_accelerators"), "--num_gpus", "int"),
    Option(("--master_addr",), "--master_addr", "str"),
    Option(("--master_port",), "--master_port", "int"),
    Option(("--no_ssh",), "--no_ssh", "flag"),
    Option(("--node_rank",), "--node_rank", "int"),
    Option(("--launcher",), "--launcher", "str"),
    Option(("--launcher_args",), "--launcher_args", "str"),
    Option(("--ssh_port",), "--ssh_port", "int"),
    Option(("--venv_script",), "--venv_script", "str"),
    Option(("--enable_each_rank_log",), "--enable_each_rank_log", "str"),
    Option(("--no_ssh_check",), "--no_ssh_check", "flag"),
    Option(("--force_multi",), "--force_multi", "flag"),
    Option(("--no_local_rank",), "--no_local_rank", "flag"),
)
# Ours alone: read here, never passed to the runner or the script.
PRELAUNCH_OPTIONS: tuple[Option, ...] = (Option((ALLOW_CROSS_NODE_EP,), ALLOW_CROSS_NODE_EP, "flag"),)
_BY_NAME = {name: opt for opt in OPTIONS + PRELAUNCH_OPTIONS for name in opt.names}
# What the runner ignores under --no_ssh (it then runs deepspeed.launcher.launch on this node only, no ssh or pdsh).
_SSH_ONLY = ("--launcher_args", "--ssh_port", "--venv_script", "--force_multi")
_BYPASS = "run `deepspeed [options] launch/pretrain.py ...` directly to use it without these checks"
# Runner options that change which processes start in ways the checks here do not model.
REJECTED: dict[str, str] = {
    "--include": f"select hosts by editing the hostfile or with --num_nodes/--num_gpus; {_BYPASS}",
    "-i": f"select hosts by editing the hostfile or with --num_nodes/--num_gpus; {_BYPASS}",
    "--exclude": f"select hosts by editing the hostfile or with --num_nodes/--num_gpus; {_BYPASS}",
    "-e": f"select hosts by editing the hostfile or with --num_nodes/--num_gpus; {_BYPASS}",
    "--module": "the script is launch/pretrain.py",
    "--no_python": "the script is launch/pretrain.py",
    "--autotuning": _BYPASS,
}


def is_under_launcher(environ: dict[str, str] | None = None) -> bool:
    """True inside a process started by a launcher (DeepSpeed, torchrun, mpirun), where prelaunch must not run."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHED_ENV)


def wants_prelaunch(argv: list[str], environ: dict[str, str] | None = None) -> bool:
    """True for `python launch/pretrain.py --hostfile H ...` run by hand (not under a launcher)."""
    has_hostfile = any(a.partition("=")[0] in ("--hostfile", "-H") for a in argv[1:])
    return has_hostfile and not is_under_launcher(environ)


def _value(opt: Option, name: str, raw: str) -> str | int:
    if opt.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} expects an integer, found {raw!r}") from None
    return raw


def split_launcher_args(args: list[str]) -> tuple[dict[str, str | int | bool], list[str]]:
    """Split the arguments after the script path into launch options (runner options keyed by the runner's name, and
    PRELAUNCH_OPTIONS by theirs) and the script's own.

    `--name value` and `--name=value` are both read; `--` ends the runner options (it and what follows pass through).

    Raises:
        ValueError: a rejected runner option, a missing or non-integer value, a value given to a flag, or an option
            given twice.
    """
    opts: dict[str, str | int | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            rest += args[i - 1:]
            break
        name, eq, inline = arg.partition("=")
        if name in REJECTED:
            raise ValueError(f"{name} is not supported by the validated launch (python launch/pretrain.py "
                             f"--hostfile ...): {REJECTED[name]}")
        opt = _BY_NAME.get(name) if name.startswith("-") else None
        if opt is None:
            rest.append(arg)
            continue
        if opt.runner in opts:
            raise ValueError(f"{name} is given twice")
        if opt.kind == "flag":
            if eq:
                raise ValueError(f"{name} takes no value, found {arg!r}")
            opts[opt.runner] = True
            continue
        if not eq:
            if i == len(args):
                raise ValueError(f"{name} expects a value")
            inline = args[i]
            i += 1
        opts[opt.runner] = _value(opt, name, inline)
    return opts, rest


def runner_command(script: str, opts: dict[str, str | int | bool], rest: list[str]) -> list[str]:
    """The DeepSpeed runner command line that starts `script rest...` with runner options `opts`."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    for opt in OPTIONS:
        if opt.runner not in opts:
            continue
        value = opts[opt.runner]
        cmd.append(opt.runner if opt.kind == "flag" else f"{opt.runner}={value}")
    return cmd + [script, *rest]


def _launcher_errors(opts: dict[str, str | int | bool], hosts: HostPool, gpus: dict[str, int],
                     path: str) -> list[str]:
    launcher = str(opts.get("--launcher", "pdsh")).lower()
    if launcher not in LAUNCHERS:
        return [f"--launcher {opts['--launcher']!r} is not one of DeepSpeed's launchers: {', '.join(LAUNCHERS)}"]
    errors = []
    if launcher in _WHOLE_HOSTFILE and ("--num_nodes" in opts or "--num_gpus" in opts):
        errors.append(f"--launcher {launcher} always uses every slot of the hostfile (DeepSpeed rejects --num_nodes "
                      f"and --num_gpus with it); edit the hostfile instead")
    if launcher in _EVEN_SLOTS and len(set(gpus.values())) > 1:
        errors.append(f"--launcher {launcher} needs the same GPU count on every host, found "
                      f"{describe_world(hosts, gpus, path)}")
    port = opts.get("--master_port")
    if port is not None and not 1 <= int(port) <= 65535:
        errors.append(f"--master_port ({port}) must be in 1..65535")
    return errors


def _no_ssh_errors(opts: dict[str, str | int | bool], hosts: HostPool, selected: dict[str, int],
                   path: str) -> list[str]:
    """Checks of a per-node launch (`--no_ssh --node_rank K`), which DeepSpeed makes with a bare assert or an ssh."""
    if "--no_ssh" not in opts:
        if "--node_rank" in opts:
            return ["--node_rank is read only with --no_ssh (pdsh numbers the nodes itself); add --no_ssh to launch "
                    "each node yourself, or drop --node_rank"]
        return []
    errors = []
    nodes = describe_world(hosts, selected, path)
    rank = opts.get("--node_rank")
    if rank is None:
        errors.append(f"--no_ssh needs --node_rank K, this node's place among the hostfile's nodes ({nodes}): "
                      f"0..{len(selected) - 1}, a different K on each node")
    elif not 0 <= int(rank) < len(selected):
        errors.append(f"--node_rank ({rank}) must be in 0..{len(selected) - 1}, one per node of {nodes}")
    if "--master_addr" not in opts:
        first = next(iter(selected))
        errors.append(f"--no_ssh needs --master_addr: the address of node rank 0 ({first!r}) that every node can "
                      f"reach, the same on every node (without it DeepSpeed runs `ssh {first} hostname -I`)")
    launcher = str(opts.get("--launcher", "pdsh")).lower()
    ignored = [name for name in _SSH_ONLY if name in opts] + (["--launcher"] if launcher != "pdsh" else [])
    if ignored:
        errors.append(f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --no_ssh "
                      f"(each node starts its own processes, without ssh or a launcher); drop "
                      f"{'it' if len(ignored) == 1 else 'them'}")
    return errors


def _is_this_machine(host: str) -> bool:
    short = host.split(".")[0]
    names = {"localhost", "127.0.0.1", socket.gethostname().split(".")[0], socket.getfqdn().split(".")[0]}
    return short in names


def prelaunch(argv: list[str], ep_size: int) -> list[str]:
    """Check a `python SCRIPT --hostfile H ...` launch (options, hostfile, node layout); return the DeepSpeed runner
    command. The run config's own checks against the world size (batch arithmetic, ep_size against the processes and
    the experts) are the run plan's: resolve it first (framework/config/plan.py resolve_plan).

    Args:
        argv: the script's `sys.argv` (argv[0] is the script path).
        ep_size: `parallel.ep_size` of the resolved run plan, for the node-level expert-parallel layout.

    Returns:
        `[sys.executable, "-m", "deepspeed.launcher.runner", --hostfile=H, ..., argv[0], *script_args]`, for
        `os.execvp(cmd[0], cmd)`.

    Raises:
        FileNotFoundError / ValueError: the hostfile is missing or bad (one line naming `path:LINE`), or every problem
            with the launcher options, the host selection, the expert-parallel layout over the nodes and
            `.deepspeed_env`, one per line.
        RuntimeError: called inside a launched process.

    With `--no_ssh --node_rank K` the command starts this node's processes only (rank K of the hostfile's nodes);
    every node runs the same line with its own K. `--allow_cross_node_ep` lifts the one-node limit on
    expert-parallel groups and is not passed on.
    """
    if is_under_launcher():
        raise RuntimeError("prelaunch runs before the launcher, not inside a launched process (LOCAL_RANK is set)")
    opts, rest = split_launcher_args(argv[1:])
    if "--hostfile" not in opts:
        raise ValueError("the validated launch needs --hostfile H (lines 'HOST slots=N'); for one machine run "
                         "`deepspeed [--num_gpus N] launch/pretrain.py ...` instead")
    path = str(opts["--hostfile"])
    hosts = parse_hostfile(path)
    num_gpus, num_nodes = opts.get("--num_gpus"), opts.get("--num_nodes")
    selected = select_gpus(hosts, num_gpus, num_nodes, path, [])  # check_world reports selection errors
    no_ssh = bool(opts.get("--no_ssh"))
    errors = _launcher_errors(opts, hosts, selected, path) + _no_ssh_errors(opts, hosts, selected, path)
    try:
        check_world(hosts, num_gpus, num_nodes, ep_size, path, ep_across_nodes=bool(opts.get(ALLOW_CROSS_NODE_EP)))
    except ValueError as e:
        errors.append(str(e))
    multi_node = (len(selected) > 1 or bool(opts.get("--force_multi"))) and not no_ssh
    if multi_node:  # the runner reads .deepspeed_env only on its multi-node path
        for env_file in deepspeed_env_files():
            try:
                check_deepspeed_env(env_file)
            except ValueError as e:
                errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    ignored_env = deepspeed_env_files() if no_ssh else []
    if ignored_env:
        print(f"prelaunch: warning: with --no_ssh DeepSpeed's runner does not export {', '.join(ignored_env)}; set "
              f"those variables in each node's own environment", file=sys.stderr)
    if not multi_node and not no_ssh and not _is_this_machine(next(iter(selected))):
        host = next(iter(selected))
        print(f"prelaunch: warning: {path} selects one host ({host!r}); DeepSpeed then starts every rank on this "
              f"machine ({socket.gethostname()}), not on {host!r}; pass --force_multi to launch there over ssh",
              file=sys.stderr)
    return runner_command(argv[0], opts, rest)
