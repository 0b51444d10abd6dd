#!/usr/bin/env python
"""Throughput and peak memory of tools/moe_merge.py and tools/moe_split.py on a multi-GB synthetic checkpoint.

Writes a per-expert Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer shapes (128 experts of [768, 2048] bf16, its
attention and router) but as many layers as fit `--gb`, then `--repeat` times (the numbers are medians over the
repeats; the disk and the other users of the machine are noisy):

- measures the disk's cold sequential read bandwidth on those same files, 16 MB reads, with and without
  posix_fadvise(SEQUENTIAL) (the faster of the two is the reference: the stricter one);
- measures a second reference, the copy bandwidth: the same files read in one thread while as many bytes are written
  with O_DIRECT and fsynced in another, no conversion at all (a conversion reads and writes every byte once, and on
  many disks, virtual ones especially, reads and writes share one budget: then no conversion gets far past it);
- runs merge and split as child processes on a cold cache, and again with fsync disabled (`--no_fsync_cost` skips
  these) to show what durability costs.

Before each measurement the page cache is dropped (/proc/sys/vm/drop_caches when allowed, else fsync +
posix_fadvise(DONTNEED) file by file) and the benchmark waits until the disk is idle (deleted files are discarded by
the filesystem in the background). It reports MB/s (input tensor bytes / the tool's own conversion time, which ends
after its fsyncs and the final rename), the ratios to the read bandwidth (xread) and to the copy bandwidth (xcopy),
peak RSS (the child's ru_maxrss from wait4), and the CPU the machine's other processes used meanwhile (others, in
cores), against the targets:

- peak RSS <= 2 x (max shard size + one layer's experts)
- throughput >= 50% of the measured read bandwidth

    python benchmarks/convert_checkpoint.py --gb 3 [--repeat 3] [--work_dir DIR] [--max_shard_size 1GB] [--keep]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen3-30B-A3B (DESIGN-NOTES.md): hidden 2048, moe_intermediate 768, 128 experts, top-8, 32 q / 4 kv heads of 128.
QWEN3_30B = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144)


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (c["head_dim"],),
            "self_attn.k_norm.weight": (c["head_dim"],), "mlp.gate.weight": (c["num_experts"], h)}


def nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


class RandomPool:
    """Distinct-looking tensor contents without paying for randn on GBs: slices of one random pool."""

    def __init__(self, size: int = 64 << 20, seed: int = 0):
        import torch  # noqa: PLC0415 - only the generating child imports torch (see main)

        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size // 2, generator=g) * 0.02).to(torch.bfloat16)
        self.offset = 0

    def tensor(self, shape: tuple[int, ...]):
        n = nbytes(shape) // 2
        if self.offset + n > self.pool.numel():
            self.offset = 0
        out = self.pool[self.offset:self.offset + n].clone().reshape(shape)
        self.offset += 4099  # an odd stride so consecutive tensors differ
        return out


def make_checkpoint(path: str, gb: float, vocab: int, input_shard: str) -> dict:
    sys.path.insert(0, ROOT)
    from framework.checkpoint.hf_writer import ShardedWriter  # noqa: PLC0415

    c = dict(QWEN3_30B)
    h, i, e = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    expert_bytes = e * 3 * nbytes((i, h))
    per_layer = expert_bytes + sum(nbytes(s) for s in layer_shapes(c).values())
    fixed = 2 * nbytes((vocab, h)) + nbytes((h,))
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **c, "vocab_size": vocab,
              "num_hidden_layers": layers, "mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": True,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "dtype": "bfloat16"}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 4096}, f)
    pool = RandomPool(max(64 << 20, nbytes((vocab, h)) + (16 << 20)))
    writer = ShardedWriter(path, input_shard)
    writer.add("model.embed_tokens.weight", pool.tensor((vocab, h)))
    for layer in range(layers):
        for name, shape in layer_shapes(c).items():
            writer.add(f"model.layers.{layer}.{name}", pool.tensor(shape))
        for x in range(e):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                writer.add(f"model.layers.{layer}.mlp.experts.{x}.{proj}.weight", pool.tensor(shape))
    writer.add("model.norm.weight", pool.tensor((h,)))
    writer.add("lm_head.weight", pool.tensor((vocab, h)))
    writer.close()
    return {"layers": layers, "expert_bytes_per_layer": expert_bytes, "total_bytes": writer.total_size}


def weight_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def drop_cache(paths: list[str]) -> str:
    """Make the next reads of `paths` come from the disk; returns how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def disk_stat_path(path: str) -> str | None:
    st = os.stat(path)
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else None


def wait_disk_idle(path: str, timeout: float = 20.0) -> float:
    """os.sync, then wait until the disk holding `path` has had no I/O for 0.5 s (deleting GBs makes the filesystem
    discard in the background for seconds). Returns the seconds waited."""
    start = time.perf_counter()
    os.sync()
    stat = disk_stat_path(path)
    if stat is None:
        time.sleep(1.0)
        return time.perf_counter() - start

    def sample():
        with open(stat) as f:
            fields = [int(x) for x in f.read().split()]
        # reads, writes, in flight, discards completed
        return fields[0], fields[4], fields[8], fields[11] if len(fields) > 11 else 0

    last, quiet_since = sample(), time.perf_counter()
    while time.perf_counter() - start < timeout:
        time.sleep(0.1)
        now = sample()
        if now != last or now[2]:
            last, quiet_since = now, time.perf_counter()
        elif time.perf_counter() - quiet_since >= 0.5:
            break
    return time.perf_counter() - start


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def read_bandwidth(paths: list[str], sequential_hint: bool, block: int = 16 << 20) -> tuple[float, int]:
    """Cold sequential read of `paths` with large buffered reads into one reused buffer: (MB/s, bytes)."""
    buf = mmap.mmap(-1, block)  # touched once before timing: page faults are not the disk's
    buf.write(b"\0" * block)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if sequential_hint:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start) / 1e6, total


def copy_bandwidth(paths: list[str], out_dir: str, block: int = 32 << 20) -> float:
    """Cold read of `paths` in one thread while the same number of bytes is written with O_DIRECT (plain writes
    where the filesystem refuses it) and fsynced in another: MB/s copied, the most any conversion can do here."""
    size = sum(os.path.getsize(p) for p in paths)
    out = os.path.join(out_dir, "copy_ceiling.bin")
    wbuf = mmap.mmap(-1, block)
    wbuf.write(b"\1" * block)
    errors: list[BaseException] = []

    def reader():
        try:
            read_bandwidth(paths, True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer():
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.close(fd)
            try:
                fd = os.open(out, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                fd = os.open(out, os.O_WRONLY)
            try:
                for offset in range(0, size - size % block, block):
                    os.pwrite(fd, wbuf, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    os.remove(out)
    if errors:
        raise errors[0]
    return size / seconds / 1e6


# Runs a tool as `python TOOL ARGS` would, printing the conversion's own time to the millisecond (the tool prints
# tenths); with BENCH_NO_FSYNC set, with durability switched off, for the cost of the fsyncs. Benchmark-only patches.
RUNNER = """
import os, runpy, sys
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, os.environ["BENCH_ROOT"])
from framework.checkpoint import atomic_dir, expert_convert, hf_writer
if os.environ.get("BENCH_NO_FSYNC"):
    init = hf_writer.ShardedWriter.__init__
    hf_writer.ShardedWriter.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "fsync": False})
    atomic_dir.fsync_tree = atomic_dir.fsync_dir = lambda path: None
convert = expert_convert.convert_checkpoint
def timed(*args, **kwargs):
    report = convert(*args, **kwargs)
    print(f"BENCH_SECONDS={report.seconds:.4f}", file=sys.stderr)
    return report
expert_convert.convert_checkpoint = timed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(cmd: list[str], env: dict | None = None, poll_s: float = 0.02) -> dict:
    """Run `cmd`, polling /proc for its peak RSS (VmHWM: the high-water mark of the process after exec; ru_maxrss
    from wait4 would also count the benchmark's own memory, which Linux carries across fork + exec)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy0 = cpu_busy_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            key = line.split(":")[0]
                            if key in peaks:
                                peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
                except (OSError, ValueError, IndexError):
                    pass
                time.sleep(poll_s)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: Popen must not wait() on it afterwards
        wall = time.perf_counter() - start
        busy = cpu_busy_seconds() - busy0
        done.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:1] + cmd[3:] if '-c' in cmd else cmd)} failed ({proc.returncode}): "
                         f"{stderr.strip()}")
    m = re.search(r"BENCH_SECONDS=([\d.]+)", stderr) or re.search(r", ([\d.]+) s", stdout)
    child_cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "convert_s": float(m[1]) if m else wall, "maxrss": peaks["VmHWM"],
            "ru_maxrss": usage.ru_maxrss * 1024, "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"],
            "stdout": stdout.strip(), "others": max(busy - child_cpu, 0.0) / wall}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="size of the synthetic checkpoint")
    p.add_argument("--vocab", type=int, default=32000, help="embedding rows (Qwen3: 151936; smaller leaves room for "
                                                           "more expert layers in --gb)")
    p.add_argument("--max_shard_size", default="1GB", help="output shard cap passed to the tools")
    p.add_argument("--input_shard_size", default="1GB", help="shard cap of the synthetic input")
    p.add_argument("--repeat", type=int, default=3, help="measurement rounds; the summary takes medians")
    p.add_argument("--no_fsync_cost", action="store_true", help="skip the runs with fsync disabled")
    p.add_argument("--work_dir", default=None, help="where to write (default: a new directory under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--generate_into", default=None, help=argparse.SUPPRESS)  # the generating child (see below)
    args = p.parse_args(argv)
    if args.generate_into:
        info = make_checkpoint(args.generate_into, args.gb, args.vocab, args.input_shard_size)
        sys.path.insert(0, ROOT)
        from framework.checkpoint.hf_writer import parse_size  # noqa: PLC0415

        print(json.dumps({**info, "max_shard_bytes": parse_size(args.max_shard_size)}))
        return 0

    work = tempfile.mkdtemp(prefix="convert_bench_", dir=args.work_dir)
    try:
        src, merged, split = (os.path.join(work, n) for n in ("per_expert", "merged", "split"))
        t0 = time.perf_counter()
        # Generated by a child: this process stays small (no torch), so the children it starts for the tools begin
        # small too, and the polled RSS is the tools' own.
        gen = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate_into", src, "--gb", str(args.gb),
                              "--vocab", str(args.vocab), "--input_shard_size", args.input_shard_size,
                              "--max_shard_size", args.max_shard_size], capture_output=True, text=True)
        if gen.returncode != 0:
            raise SystemExit(f"generating the checkpoint failed: {gen.stderr.strip()}")
        info = json.loads(gen.stdout.strip().splitlines()[-1])
        gen_s = time.perf_counter() - t0
        total = info["total_bytes"]
        print(f"synthetic checkpoint: {info['layers']} layers x 128 experts [768,2048] bf16, {total / 1e9:.2f} GB "
              f"tensors, {len(weight_files(src))} shards, written in {gen_s:.1f} s; {os.cpu_count()} CPUs")
        bound = 2 * (info["max_shard_bytes"] + info["expert_bytes_per_layer"])
        print(f"max shard {args.max_shard_size}, one layer's experts {info['expert_bytes_per_layer'] / 1e9:.3f} GB "
              f"-> RSS bound 2 x (shard + layer) = {bound / 1e9:.2f} GB; throughput target 50% of the read bandwidth")
        head = (f"{'round':>5} {'op':<16} {'convert s':>9} {'MB/s':>6} {'read MB/s':>9} {'xread':>6} {'copy MB/s':>9} "
                f"{'xcopy':>6} {'peak RSS GB':>11} {'RSS/bound':>9} {'others':>6}")
        print(head)
        print("-" * len(head))
        env = {**os.environ, "BENCH_ROOT": ROOT}
        env_no_fsync = {**env, "BENCH_NO_FSYNC": "1"}
        ops = [("merge", "moe_merge.py", ("--raw_hf_path", "--merge_hf_path"), src, merged),
               ("split", "moe_split.py", ("--merge_hf_path", "--output_hf_path"), merged, split)]
        rows: list[dict] = []
        for rnd in range(1, args.repeat + 1):
            for path in (merged, split):
                shutil.rmtree(path, ignore_errors=True)
            wait_disk_idle(work)
            drop_cache(weight_files(src))
            plain, _ = read_bandwidth(weight_files(src), False)
            wait_disk_idle(work)
            drop_cache(weight_files(src))
            hinted, _ = read_bandwidth(weight_files(src), True)
            bw = max(plain, hinted)
            wait_disk_idle(work)
            drop_cache(weight_files(src))
            copy_bw = copy_bandwidth(weight_files(src), work)
            print(f"{rnd:>5} {'disk':<16} read {plain:.0f} MB/s plain, {hinted:.0f} MB/s with fadvise(SEQUENTIAL) "
                  f"-> {bw:.0f}; copy {copy_bw:.0f} MB/s")
            variants = [("", False)] + ([] if args.no_fsync_cost else [(" (no fsync)", True)])
            for suffix, no_fsync in variants:
                for name, tool, flags, inp, out in ops:
                    shutil.rmtree(out, ignore_errors=True)
                    wait_disk_idle(work)
                    drop_cache(weight_files(inp))
                    tool_args = [os.path.join(ROOT, "tools", tool), flags[0], inp, flags[1], out,
                                 "--max_shard_size", args.max_shard_size, "--quiet"]
                    r = run_child([sys.executable, "-c", RUNNER, *tool_args], env_no_fsync if no_fsync else env)
                    r.update(round=rnd, op=name + suffix, read=bw, plain=plain, copy=copy_bw, mbps=total / r["convert_s"] / 1e6)
                    rows.append(r)
                    print(f"{rnd:>5} {r['op']:<16} {r['convert_s']:>9.2f} {r['mbps']:>6.0f} {bw:>9.0f} "
                          f"{r['mbps'] / bw:>6.2f} {copy_bw:>9.0f} {r['mbps'] / copy_bw:>6.2f} "
                          f"{r['maxrss'] / 1e9:>11.2f} {r['maxrss'] / bound:>9.2f} {r['others']:>6.2f}", flush=True)

        print(f"\nmedians over {args.repeat} round(s) (ratios are medians of the per-round ratios):")
        print(f"{'op':<16} {'convert s':>9} {'MB/s':>6} {'xread':>6} {'xcopy':>6} {'peak RSS GB':>11} {'RSS/bound':>9}")
        ok = True
        summary = {}
        for op in dict.fromkeys(r["op"] for r in rows):
            mine = [r for r in rows if r["op"] == op]
            m = {k: median([f(r) for r in mine]) for k, f in (
                ("convert_s", lambda r: r["convert_s"]), ("mbps", lambda r: r["mbps"]),
                ("xread", lambda r: r["mbps"] / r["read"]), ("xcopy", lambda r: r["mbps"] / r["copy"]),
                ("rss", lambda r: r["maxrss"]))}
            summary[op] = m
            print(f"{op:<16} {m['convert_s']:>9.2f} {m['mbps']:>6.0f} {m['xread']:>6.2f} {m['xcopy']:>6.2f} "
                  f"{m['rss'] / 1e9:>11.2f} {m['rss'] / bound:>9.2f}")
            if "fsync" not in op:
                ok = ok and m["rss"] <= bound and m["xread"] >= 0.5
        print(f"read bandwidth {median([r['read'] for r in rows]):.0f} MB/s (plain reads without the hint: "
              f"{median([r['plain'] for r in rows]):.0f} MB/s), copy bandwidth "
              f"{median([r['copy'] for r in rows]):.0f} MB/s (= {median([r['copy'] / r['read'] for r in rows]):.2f} "
              "x read)")
        for name in ("merge", "split"):
            if name in summary:  # every byte is read once and written once
                io = 2 * summary[name]["mbps"]
                print(f"disk traffic during {name}: {io:.0f} MB/s read + written = "
                      f"{2 * summary[name]['xread']:.2f} x the read bandwidth")
        for name in ("merge", "split"):
            if f"{name} (no fsync)" in summary:
                cost = summary[name]["convert_s"] - summary[f"{name} (no fsync)"]["convert_s"]
                print(f"fsync cost, {name}: {cost:+.2f} s of {summary[name]['convert_s']:.2f} s (median with - median "
                      "without)")
        print(f"targets (RSS/bound <= 1, xread >= 0.50, on the medians): {'met' if ok else 'NOT met'}")
        return 0
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
