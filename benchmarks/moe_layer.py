"""One MoE layer, bf16, forward+backward, on one GPU: our backends against the stock alternatives.

    python benchmarks/moe_layer.py [--tokens 4096 16384 65536] [--iters 20] [--out results.json]
    python benchmarks/moe_layer.py --config model_configs/mixtral-8x7b.yaml   # any family, at its real width

FLOPs per step = 18 * T * k * H * I (three expert GEMMs; forward, input grad, weight grad), plus 6 * T * the block's
other matmul parameters (router, shared experts). Measured in the same run: the dense bf16 matmul ceiling (a large
square GEMM), the stock transformers 5 MoE block of the same family with experts_implementation="grouped_mm", and
(Qwen3-30B-A3B shape only, the default) stock MegaBlocks dMoE (its own router and GroupedGLU). Times are medians of
CUDA-event timings after warm-up; "kept GiB" is what the forward keeps for the backward (each layer of a model holds
that until its backward), "step GiB" what one step allocates at its peak beyond its input and the block's parameters
(the kept activations, the backward's workspace and the parameters' gradients). Without --config: one Qwen3-30B-A3B
layer.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from framework.moe.experts import megablocks_import_error
from framework.moe.layer import MoEBlock
from framework.moe.router import TopKRouter

H, I, E, K = 2048, 768, 128, 8


def time_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_peak_gib(step) -> float:
    """GiB one step allocates at its peak beyond what was allocated before it (the block's parameters, its input):
    the activations kept for the backward, the backward's workspace and the parameters' gradients (the step drops
    them first)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def kept_gib(module, x, dy, unpack) -> float:
    """GiB the forward keeps for the backward (allocated after it, less its output): what each layer of a model
    holds until its backward when nothing is recomputed."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = unpack(module(x))
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    out.backward(dy)
    return kept / 2**30


def matmul_ceiling_tflops(iters: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters)
    return 2 * n**3 / ms / 1e9


def fwd_bwd(module, x, dy, unpack=lambda out: out):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        unpack(module(x)).backward(dy)
    return step


def init_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def ours(backend: str):
    return init_(MoEBlock(H, I, E, TopKRouter(H, E, K, True), torch.nn.SiLU(), backend=backend).cuda().bfloat16())


def stock_transformers():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    return init_(Qwen3MoeSparseMoeBlock(cfg).cuda().bfloat16())


def family_blocks(config_yaml: str):
    """(our block builder per backend, the stock block builder, (H, I, E, K), extra matmul params) for the first MoE
    layer of the model a run YAML describes (model.hf_config or model.path's config.json), whatever its family."""
    import sys  # noqa: PLC0415

    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    from framework.config.load import load_run_config  # noqa: PLC0415
    from framework.config.plan import resolve_model  # noqa: PLC0415
    from framework.models.decoder import DecoderLayer  # noqa: PLC0415
    from framework.models.options import ModelOptions  # noqa: PLC0415
    from framework.models.registry import architecture_for, moe_shape  # noqa: PLC0415

    cfg = load_run_config(config_yaml, [])
    _, config = resolve_model(cfg)
    config._attn_implementation = "sdpa"
    arch = architecture_for(config)
    layer = next(i for i in range(config.num_hidden_layers) if arch.layout.is_moe_layer(config, i))
    inter, experts, top_k, _ = moe_shape(config)

    def ours_block(backend: str):
        with torch.device("cuda"):
            block = DecoderLayer(config, layer, ModelOptions(backend=backend), arch).mlp
        return init_(block.bfloat16())

    def stock_block(experts_implementation: str = "grouped_mm"):
        fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        stock_config = AutoConfig.for_model(config.model_type, **fields)
        stock_config._experts_implementation = experts_implementation
        stock_config._attn_implementation = "sdpa"
        module = sys.modules[AutoModelForCausalLM._model_mapping[type(stock_config)].__module__]
        layer_cls = next(v for k, v in vars(module).items() if k.endswith("DecoderLayer") and isinstance(v, type))
        with torch.device("cuda"):
            block = layer_cls(stock_config, layer).mlp
        return init_(block.bfloat16())

    with torch.device("meta"):
        probe = DecoderLayer(config, layer, ModelOptions(backend="eager"), arch).mlp
    extra = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("experts."))
    return ours_block, stock_block, (config.hidden_size, inter, experts, top_k), extra


def stock_megablocks():
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(hidden_size=H, ffn_hidden_size=I, moe_num_experts=E, moe_top_k=K, mlp_type="glu",
                     mlp_impl="grouped", activation_fn=F.silu, bias=False, return_bias=False,
                     moe_normalize_expert_weights=1, moe_loss_weight=0.0, fp16=False, bf16=True,
                     device=torch.cuda.current_device(), num_layers=1)
    return init_(dMoE(args))


def print_kernels(step, label: str, top: int, iters: int = 5) -> None:
    """Where one forward+backward spends device time, per kernel (averaged over `iters` profiled steps)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / iters / 1e3
    print(f"\n{label}: {total:.2f} ms of kernels per step")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        ms = e.self_device_time_total / iters / 1e3
        print(f"  {ms:7.3f} ms {100 * ms / total:5.1f}%  x{e.count // iters:<3} {e.key[:90]}")


def timeline_rows(trace_events: list[dict], start_us: float, end_us: float) -> list[dict]:
    """The kernels launched between `start_us` and `end_us` of a Chrome trace (torch profiler, CPU + CUDA), in device
    order: each one's launch time on the host and start on the device relative to `start_us`, its duration and the
    time the device sat idle before it (all in us)."""
    launches = {e["args"]["correlation"]: e["ts"] for e in trace_events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    rows = []
    for e in trace_events:
        host = launches.get(e.get("args", {}).get("correlation")) if e.get("cat") == "kernel" else None
        if host is not None and start_us <= host <= end_us:
            rows.append({"name": e["name"], "host": host - start_us, "start": e["ts"] - start_us, "dur": e["dur"]})
    rows.sort(key=lambda r: r["start"])
    for prev, row in zip([None] + rows, rows):
        row["idle_before"] = 0.0 if prev is None else max(row["start"] - prev["start"] - prev["dur"], 0.0)
    return rows


def print_timeline(step, label: str) -> None:
    """One profiled step kernel by kernel: when the host launched it, when the device ran it, and how long the device
    waited for it. Idle time before the step's first long kernel is host time the synced step pays in full."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("timeline_step"):
            step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    marker = next(e for e in events if e.get("name") == "timeline_step" and e.get("ph") == "X")
    rows = timeline_rows(events, marker["ts"], marker["ts"] + marker["dur"])
    first_long = next((i for i, r in enumerate(rows) if r["dur"] >= 100), len(rows))
    idle_before = sum(r["idle_before"] for r in rows[:first_long + 1])
    idle_after = sum(r["idle_before"] for r in rows[first_long + 1:])
    print(f"\n{label}: device idle {idle_before / 1e3:.2f} ms up to the first kernel of >= 100 us, "
          f"{idle_after / 1e3:.2f} ms after it (profiled: host times are inflated)")
    print(f"  {'host ms':>8} {'device ms':>10} {'us':>7} {'idle us':>8}")
    for r in rows:
        print(f"  {r['host'] / 1e3:8.3f} {r['start'] / 1e3:10.3f} {r['dur']:7.1f} {r['idle_before']:8.1f}  "
              f"{r['name'][:60]}")


def overheads(step, iters: int) -> dict:
    """Where a step's wall time goes beside its kernels: per-step time when the host may run ahead over several steps,
    the host's enqueue time alone (the GPU kept busy so that it never waits), the kernels' device time, the time of a
    CUDA-graph replay of the same step (no launch cost: the device-bound floor) and the host syncs one step makes.
    The host enqueue, taken after ~100 ms of queued device work, overstates the host: on an H200 (session 13) it read
    3.39 ms for a step that ran back to back at 2.58 ms, which bounds the host from above. benchmarks/layer_host.py
    times the host stage by stage after a plain sync and back to back."""
    import time  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    ahead_ms = (time.perf_counter() - start) / iters * 1e3
    enqueue = []
    for _ in range(iters):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))  # ~100 ms of device time queued first: the host never waits for the GPU below
        t0 = time.perf_counter()
        step()
        enqueue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch warns once per process that the debug mode is a prototype: that notice is not a sync.
    syncs = [str(w.message).split("\n")[0][:80] for w in caught
             if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 5 / 1e3
    launches = sum(e.count for e in kernels) // 5
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph_ms = time_ms(graph.replay, iters)
        del graph
    except Exception as exc:  # a sync or a host-dependent shape inside the step cannot be captured
        graph_ms = f"capture failed: {type(exc).__name__}: {str(exc)[:120]}"
    return {"ahead_ms": ahead_ms, "enqueue_ms": statistics.median(enqueue), "kernel_ms": kernel_ms,
            "kernels": launches, "graph_ms": graph_ms, "syncs": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backends", nargs="+", default=["grouped_mm", "megablocks"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", type=int, default=0, help="print this many top kernels (device time) per row")
    parser.add_argument("--timeline", action="store_true",
                        help="per row also: one profiled step kernel by kernel (host launch, device start, idle)")
    parser.add_argument("--overheads", action="store_true",
                        help="per row also: host enqueue time, kernel time, CUDA-graph replay time, host syncs")
    parser.add_argument("--config", help="run YAML of the model whose first MoE layer to time (default: Qwen3-30B-A3B)")
    args = parser.parse_args()

    ceiling = matmul_ceiling_tflops(args.iters)
    mb_missing = megablocks_import_error()
    backends = [b for b in args.backends if not (b == "megablocks" and mb_missing)]
    if args.config:
        ours_block, stock_block, (h, i, e, k), extra = family_blocks(args.config)
        impls = {f"ours:{b}": (lambda b=b: ours_block(b), lambda o: o[0]) for b in backends}
        impls["transformers-5 grouped_mm block"] = (stock_block, _first_output)
    else:
        (h, i, e, k), extra = (H, I, E, K), H * E
        impls = {f"ours:{b}": (lambda b=b: ours(b), lambda o: o[0]) for b in backends}
        impls["transformers-5 grouped_mm block"] = (stock_transformers, _first_output)
        if not mb_missing:
            impls["megablocks dMoE"] = (stock_megablocks, lambda o: o)
    print(f"H={h} I={i} E={e} K={k}; other matmul parameters in the block (router, shared experts): {extra:,}")
    rows = []
    for tokens in args.tokens:
        flops = 18 * tokens * k * h * i + 6 * tokens * extra
        x = torch.randn(1, tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        for name, (build, unpack) in impls.items():
            module = build()
            step = fwd_bwd(module, x, dy, unpack)
            ms = time_ms(step, args.iters)
            if args.profile:
                print_kernels(step, f"T={tokens} {name}", args.profile)
            if args.timeline:
                print_timeline(step, f"T={tokens} {name}")
            rows.append({"tokens": tokens, "impl": name, "ms": ms, "tflops": flops / ms / 1e9,
                         "peak_gib": step_peak_gib(step), "kept_gib": kept_gib(module, x, dy, unpack)})
            if args.overheads:
                rows[-1]["overheads"] = overheads(step, args.iters)
            del module
            torch.cuda.empty_cache()
        for r in rows:
            if r["tokens"] == tokens:
                r["ceiling_ms"] = flops / ceiling / 1e9
    device = torch.cuda.get_device_name()
    print(f"\n{device}; dense bf16 matmul ceiling {ceiling:.0f} TFLOP/s; FLOPs = 18*T*k*H*I + 6*T*other; "
          f"megablocks: {'ok' if not mb_missing else mb_missing}")
    with_dmoe = "megablocks dMoE" in impls  # the Qwen3-30B-A3B default only
    print(f"{'T':>6} {'impl':<34} {'ms':>8} {'TFLOP/s':>8} {'%ceil':>6}" + (f" {'vs dMoE':>8}" if with_dmoe else "")
          + f" {'vs HF':>6} {'kept GiB':>9} {'step GiB':>9}")
    for r in rows:
        same_t = {q["impl"]: q["ms"] for q in rows if q["tokens"] == r["tokens"]}
        vs_mb = f" {same_t['megablocks dMoE'] / r['ms']:7.2f}x" if with_dmoe else ""
        vs_hf = same_t["transformers-5 grouped_mm block"] / r["ms"]
        print(f"{r['tokens']:>6} {r['impl']:<34} {r['ms']:8.2f} {r['tflops']:8.0f} "
              f"{100 * r['ceiling_ms'] / r['ms']:5.0f}%{vs_mb} {vs_hf:5.2f}x {r['kept_gib']:9.2f} {r['peak_gib']:9.2f}")
    if args.overheads:
        print(f"\n{'T':>6} {'impl':<34} {'synced':>7} {'ahead':>7} {'host':>7} {'kernels':>8} {'graph':>7} {'#k':>4}"
              "  (ms per step: synced each step / host running ahead / host enqueue / device kernels / graph replay)")
        for r in rows:
            o = r["overheads"]
            graph = f"{o['graph_ms']:7.2f}" if isinstance(o["graph_ms"], float) else "    n/a"
            print(f"{r['tokens']:>6} {r['impl']:<34} {r['ms']:7.2f} {o['ahead_ms']:7.2f} {o['enqueue_ms']:7.2f} "
                  f"{o['kernel_ms']:8.2f} {graph} {o['kernels']:>4}  syncs: {len(o['syncs'])} {o['syncs'][:3]}"
                  + ("" if isinstance(o["graph_ms"], float) else f" graph: {o['graph_ms']}"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "ceiling_tflops": ceiling, "rows": rows}, f, indent=1)


def _first_output(out):
    """transformers' MoE blocks return the hidden states (some versions a tuple with router logits)."""
    return out[0] if isinstance(out, tuple) else out


if __name__ == "__main__":
    main()
