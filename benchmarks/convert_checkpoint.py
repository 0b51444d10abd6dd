#!/usr/bin/env python
"""Throughput and peak memory of tools/moe_merge.py and tools/moe_split.py on a multi-GB synthetic checkpoint.

Writes a per-expert Qwen3-MoE checkpoint with Qwen3-30B-A3B's layer shapes (128 experts of [768, 2048] bf16, its
attention and router) but as many layers as fit `--gb`, measures the disk's cold sequential read bandwidth on those
same files (page cache dropped through /proc/sys/vm/drop_caches when allowed, else evicted file by file with
fsync + posix_fadvise(DONTNEED)), then runs merge and split as child processes on a cold cache and reports MB/s
(input tensor bytes / conversion time), peak RSS (the child's ru_maxrss from wait4, plus the peak of anonymous memory
polled from /proc), and the ratios against the targets:

- peak RSS <= 2 x (max shard size + one layer's experts)
- throughput >= 50% of the measured read bandwidth

    python benchmarks/convert_checkpoint.py --gb 3 [--work_dir DIR] [--max_shard_size 1GB] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from framework.checkpoint.hf_writer import ShardedWriter, parse_size  # noqa: E402

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
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size // 2, generator=g) * 0.02).to(torch.bfloat16)
        self.offset = 0

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = nbytes(shape) // 2
        if self.offset + n > self.pool.numel():
            self.offset = 0
        out = self.pool[self.offset:self.offset + n].clone().reshape(shape)
        self.offset += 4099  # an odd stride so consecutive tensors differ
        return out


def make_checkpoint(path: str, gb: float, vocab: int, input_shard: str) -> dict:
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


def read_bandwidth(paths: list[str], block: int = 16 << 20) -> tuple[float, int, str]:
    """Cold sequential read of `paths` with large buffered reads: (MB/s, bytes, cache-dropping method)."""
    how = drop_cache(paths)
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.perf_counter() - start) / 1e6, total, how


def run_child(cmd: list[str], poll_s: float = 0.02) -> dict:
    """Run `cmd`, polling /proc for its anonymous / file-backed RSS; ru_maxrss from wait4 covers what polling misses."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peaks = {"RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def poll():
            while not done.is_set():
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            key = line.split(":")[0]
                            if key in peaks:
                                peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
                except OSError:
                    pass
                time.sleep(poll_s)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child: Popen must not wait() on it afterwards
        wall = time.perf_counter() - start
        done.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.strip()}")
    m = re.search(r", ([\d.]+) s", stdout)
    return {"wall_s": wall, "convert_s": float(m[1]) if m else wall, "maxrss": usage.ru_maxrss * 1024,
            "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "stdout": stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="size of the synthetic checkpoint")
    p.add_argument("--vocab", type=int, default=32000, help="embedding rows (Qwen3: 151936; smaller leaves room for "
                                                           "more expert layers in --gb)")
    p.add_argument("--max_shard_size", default="1GB", help="output shard cap passed to the tools")
    p.add_argument("--input_shard_size", default="1GB", help="shard cap of the synthetic input")
    p.add_argument("--work_dir", default=None, help="where to write (default: a new directory under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="convert_bench_", dir=args.work_dir)
    try:
        src, merged, split = (os.path.join(work, n) for n in ("per_expert", "merged", "split"))
        t0 = time.perf_counter()
        info = make_checkpoint(src, args.gb, args.vocab, args.input_shard_size)
        gen_s = time.perf_counter() - t0
        total = info["total_bytes"]
        print(f"synthetic checkpoint: {info['layers']} layers x 128 experts [768,2048] bf16, {total / 1e9:.2f} GB "
              f"tensors, {len(weight_files(src))} shards, written in {gen_s:.1f} s")
        bw, read_bytes, how = read_bandwidth(weight_files(src))
        print(f"disk read bandwidth: {bw:.0f} MB/s (cold sequential read of {read_bytes / 1e9:.2f} GB in 16 MB "
              f"blocks after {how})")

        bound = 2 * (parse_size(args.max_shard_size) + info["expert_bytes_per_layer"])
        rows = []
        for name, tool, flags, inp, out in (
                ("merge", "moe_merge.py", ("--raw_hf_path", "--merge_hf_path"), src, merged),
                ("split", "moe_split.py", ("--merge_hf_path", "--output_hf_path"), merged, split)):
            drop_cache(weight_files(inp))
            r = run_child([sys.executable, os.path.join(ROOT, "tools", tool), flags[0], inp, flags[1], out,
                           "--max_shard_size", args.max_shard_size, "--quiet"])
            sync_start = time.perf_counter()
            os.sync()
            r["sync_s"] = time.perf_counter() - sync_start
            r["mbps"] = total / r["convert_s"] / 1e6
            r["mbps_synced"] = total / (r["convert_s"] + r["sync_s"]) / 1e6
            rows.append((name, r))

        print(f"\nmax shard {args.max_shard_size}, one layer's experts {info['expert_bytes_per_layer'] / 1e9:.3f} GB "
              f"-> RSS bound 2 x (shard + layer) = {bound / 1e9:.2f} GB; throughput target 50% of {bw:.0f} MB/s")
        head = (f"{'op':<6} {'convert s':>9} {'wall s':>7} {'MB/s':>7} {'xread':>6} {'+sync s':>8} {'MB/s synced':>12} "
                f"{'peak RSS GB':>12} {'anon GB':>8} {'RSS/bound':>10}")
        print(head)
        print("-" * len(head))
        for name, r in rows:
            print(f"{name:<6} {r['convert_s']:>9.1f} {r['wall_s']:>7.1f} {r['mbps']:>7.0f} {r['mbps'] / bw:>6.2f} "
                  f"{r['sync_s']:>8.1f} {r['mbps_synced']:>12.0f} {r['maxrss'] / 1e9:>12.2f} "
                  f"{r['peak_anon'] / 1e9:>8.2f} {r['maxrss'] / bound:>10.2f}")
        ok = all(r["maxrss"] <= bound and r["mbps"] >= 0.5 * bw for _, r in rows)
        print(f"\ntargets (RSS/bound <= 1, xread >= 0.50): {'met' if ok else 'NOT met'}")
        return 0
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
