"""The estimate as a table: one row per component, one column per moment of the step, then the verdict.

Owns: wording and layout only; every number comes from framework/tuning/estimate.py.
"""

from __future__ import annotations

from framework.tuning.activations import CHECKPOINTING_MODES
from framework.tuning.estimate import GIB, PHASE_TITLES, MemoryEstimate


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g}"


def _mode(checkpointing: bool | str) -> str:
    """train.activation_checkpointing as the report names it: on (whole layers), moe only, attention only, off."""
    if isinstance(checkpointing, bool):
        return "on" if checkpointing else "off"
    return f"{checkpointing} only"


def _row(label: str, values: list[float | None]) -> str:
    cells = "".join(f"{'-' if v is None else f'{v / GIB:.2f}':>17}" for v in values)
    return f"{label:<46}{cells}"


def format_report(est: MemoryEstimate, gpu_memory_gb: float = 80.0, gpus_per_node: int | None = None) -> str:
    z, used, shape = est.settings, est.activation_checkpointing, est.shape
    edp = est.num_gpus // est.ep_size
    dtype = "fp32" if z.grad_bytes == 4 and est.zero_stage == 3 else "bf16"
    grads = {3: f"gradients ({dtype} partitions)", 2: "gradients (bf16 partition)"}.get(est.zero_stage,
                                                                                      "gradients (bf16)")
    optimizer = "torch AdamW" if z.torch_adam else ("DeepSpeed CPU Adam" if z.offload else "DeepSpeed Adam")
    lines = [
        f"model     {shape.num_layers} layers ({shape.num_moe_layers} MoE: {shape.num_experts} experts, top-"
        f"{shape.top_k}), {_human(est.num_params)} parameters, {_human(est.num_expert_params)} in experts",
        f"setup     {est.num_gpus} GPUs: EP={est.ep_size} x EDP={edp}, ZeRO-{est.zero_stage}"
        f"{', optimizer offloaded to CPU' if est.offload else ''}; micro batch {est.micro_batch_size} x "
        f"{est.seq_len} tokens, {est.attention} attention",
        f"deepspeed reduce bucket {_human(z.reduce_bucket_size)}"
        + (f", prefetch {_human(z.prefetch_bucket_size)}, persistence <= {z.param_persistence_threshold:,}, "
           f"max live {_human(z.max_live_parameters)}, sub-group {_human(z.sub_group_size)}" if est.zero_stage == 3
           else "")
        + f"; {optimizer}; largest group stepped at once {_human(est.state.largest_step_group)} elements",
        "",
    ]
    phases = {ac: est.phases(ac) for ac in CHECKPOINTING_MODES}
    mine = phases[used]
    lines.append(f"{'per GPU, GiB':<46}" + "".join(f"{PHASE_TITLES[p.name]:>17}" for p in mine))
    lines.append(_row("parameters (bf16)", [p.parameters for p in mine]))
    lines.append(_row(grads, [p.gradients for p in mine]))
    lines.append(_row("optimizer states (fp32 master + Adam m, v)", [p.optimizer_states for p in mine]))
    for ac in CHECKPOINTING_MODES:
        mark = "  <- used" if ac == used else ""
        lines.append(_row(f"activations, checkpointing {_mode(ac)}{mark}", [p.activations for p in phases[ac]]))
    lines.append(_row("communication / prefetch buffers", [p.buffers for p in mine]))
    lines.append(_row("optimizer step temporaries", [p.optimizer_temporaries or None for p in mine]))
    lines.append(_row(f"total (checkpointing {_mode(used)})", [p.total for p in mine]))
    lines.append("")
    peak = est.peak()
    lines.append(f"peak {peak.total / GIB:.1f} GiB per GPU ({PHASE_TITLES[peak.name]}) of {gpu_memory_gb:g} GiB: "
                 f"{est.verdict(gpu_memory_gb)}")
    for ac in CHECKPOINTING_MODES:
        if ac != used:
            lines.append(f"with checkpointing {_mode(ac)}: {est.peak(ac).total / GIB:.1f} GiB: "
                         f"{est.verdict(gpu_memory_gb, ac)}")
    if est.offload:
        per_node = gpus_per_node or min(est.num_gpus, 8)
        lines.append(f"CPU: {est.cpu_bytes_per_rank / GIB:.1f} GiB per rank (fp32 master, Adam m, v, gradients), "
                     f"{per_node * est.cpu_bytes_per_rank / GIB:.1f} GiB per node of {per_node} GPUs")
    return "\n".join(lines)
