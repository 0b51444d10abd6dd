"""The hostfile's side of a validated launch: the GPUs DeepSpeed's runner will use, and the checks that need nodes.

Owns: which hosts and how many GPUs per host DeepSpeed's runner will use for `--num_nodes` / `--num_gpus`, the
description of that world for messages, and the node-level expert-parallel layout (an EP group stays inside one
node). Does not own the hostfile grammar (hostfile.py), the command line (prelaunch.py), or the checks that need only
the number of processes (batch arithmetic, ep_size against the world and the experts): those live once in
framework/config/plan.py, which launch/pretrain.py runs first, given `describe_world` so its messages name the
hostfile lines.
"""

from __future__ import annotations

from collections.abc import Mapping

_MAX_LISTED = 6  # hosts named one by one in a message before it abbreviates
# Cross-node expert parallelism is slower (all-to-all over the inter-node network instead of NVLink), not wrong: the
# layout errors below are guards against a costly accident, so each names the way to ask for it on purpose.
ALLOW_CROSS_NODE_EP = "--allow_cross_node_ep"
_OPT_IN = f" (or pass {ALLOW_CROSS_NODE_EP} to let expert-parallel groups span nodes)"


def _where(hosts: Mapping[str, int], host: str, source: str) -> str:
    """`source:LINE 'text'` when `hosts` came from parse_hostfile, else `source (host slots=N)`."""
    line = getattr(hosts, "line_of", {}).get(host)
    text = getattr(hosts, "text_of", {}).get(host, f"{host} slots={hosts[host]}")
    return f"{source}:{line} {text!r}" if line is not None else f"{source} ({text!r})"


def _lines(hosts: Mapping[str, int], selected: list[str], source: str) -> str:
    line_of = getattr(hosts, "line_of", {})
    numbers = [line_of[h] for h in selected if h in line_of]
    if not numbers:
        return source
    if len(numbers) == 1:
        return f"{source}:{numbers[0]}"
    return f"{source} lines {', '.join(map(str, numbers))}" if len(numbers) <= _MAX_LISTED else \
        f"{source} lines {numbers[0]}-{numbers[-1]}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def select_gpus(hosts: Mapping[str, int], num_gpus: int | None, num_nodes: int | None, source: str,
                errors: list[str]) -> dict[str, int]:
    """GPUs per host that DeepSpeed's runner starts: the first `num_nodes` hosts, `num_gpus` (else slots) on each.

    DeepSpeed 0.19.8 (`apply_num_nodes_and_gpus`) silently uses every host when `--num_nodes` exceeds the hostfile and
    starts `--num_gpus` processes on a host even where the hostfile lists fewer slots; both are appended to `errors`.
    """
    names = list(hosts)
    if num_nodes is not None:
        if num_nodes < 1:
            errors.append(f"--num_nodes ({num_nodes}) must be >= 1")
        elif num_nodes > len(names):
            errors.append(f"--num_nodes ({num_nodes}) exceeds the {len(names)} host(s) in "
                          f"{_lines(hosts, names, source)}; add hosts to the hostfile or lower --num_nodes")
        else:
            names = names[:num_nodes]
    if num_gpus is None:
        return {h: hosts[h] for h in names}
    if num_gpus < 1:
        errors.append(f"--num_gpus ({num_gpus}) must be >= 1")
        return {h: hosts[h] for h in names}
    for h in names:
        if hosts[h] < num_gpus:
            errors.append(f"--num_gpus ({num_gpus}) exceeds slots={hosts[h]} of {_where(hosts, h, source)}; "
                          f"lower --num_gpus or fix the slots")
    return {h: num_gpus for h in names}


def describe_world(hosts: Mapping[str, int], gpus: Mapping[str, int], source: str) -> str:
    """Where the processes come from, e.g. `2 hosts x 8 GPUs, hostfile lines 2, 3`."""
    where = _lines(hosts, list(gpus), source)
    counts = set(gpus.values())
    if len(counts) == 1:
        return f"{len(gpus)} host{'s' if len(gpus) > 1 else ''} x {counts.pop()} GPUs, {where}"
    shown = ", ".join(f"{h}:{n}" for h, n in list(gpus.items())[:_MAX_LISTED])
    more = ", ..." if len(gpus) > _MAX_LISTED else ""
    return f"{shown}{more} GPUs, {where}"


def _ep_errors(hosts: Mapping[str, int], gpus: Mapping[str, int], ep_size: int, source: str,
               ep_across_nodes: bool) -> list[str]:
    # ep_size against the world size and the experts is the plan's check (framework/config/plan.py check_parallel)
    if ep_size <= 1 or not gpus or ep_across_nodes:
        return []
    # EP groups are blocks of consecutive ranks and DeepSpeed numbers ranks node by node, so a group stays inside one
    # node (its all-to-all on NVLink) exactly when every node has the same GPU count G and ep_size divides G.
    first = next(iter(gpus))
    odd = [h for h in gpus if gpus[h] != gpus[first]]
    if odd:
        return [f"parallel.ep_size ({ep_size}) > 1 needs the same GPU count on every node, but "
                f"{_where(hosts, first, source)} has {gpus[first]} and {_where(hosts, odd[0], source)} has "
                f"{gpus[odd[0]]}; an expert-parallel group of consecutive ranks would span two nodes; give every "
                f"host the same slots, or pass --num_gpus{_OPT_IN}"]
    per_node = gpus[first]
    if ep_size > per_node:
        return [f"parallel.ep_size ({ep_size}) exceeds the {per_node} GPUs of one node "
                f"({_where(hosts, first, source)}); expert-parallel groups are consecutive ranks, so the expert "
                f"all-to-all would leave NVLink for the inter-node network; set parallel.ep_size to one of "
                f"{_divisors(per_node)}{_OPT_IN}"]
    if per_node % ep_size:
        return [f"parallel.ep_size ({ep_size}) must divide the {per_node} GPUs per node "
                f"({_where(hosts, first, source)}), else an expert-parallel group of consecutive ranks spans two "
                f"nodes; choose one of {_divisors(per_node)}{_OPT_IN}"]
    return []


def check_world(hosts: Mapping[str, int], num_gpus: int | None, num_nodes: int | None, ep_size: int, source: str,
                ep_across_nodes: bool = False) -> int:
    """Check the hosts a launch selects and their expert-parallel layout; return the world size (processes).

    Only what needs the hostfile is checked here; ep_size against the world size and the experts, and the batch
    arithmetic, are the run plan's (framework/config/plan.py resolve_plan), which the launch runs first.

    Args:
        hosts: ordered host -> slots, from `parse_hostfile` (then errors name the lines) or any mapping.
        num_gpus, num_nodes: the launcher's `--num_gpus` / `--num_nodes`, None when not given.
        ep_size: `parallel.ep_size`.
        source: the hostfile path, for messages.
        ep_across_nodes: allow expert-parallel groups that span nodes (no node-level layout rule then).

    Raises:
        ValueError: every problem found, one per line, each naming the option or config key and the hostfile line(s).
    """
    errors: list[str] = []
    gpus = select_gpus(hosts, num_gpus, num_nodes, source, errors)
    errors += _ep_errors(hosts, gpus, ep_size, source, ep_across_nodes)
    if errors:
        raise ValueError("\n".join(errors))
    return sum(gpus.values())
