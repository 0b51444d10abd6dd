#!/usr/bin/env python
"""Export a framework DeepSpeed checkpoint (ZeRO-1/2/3, any expert-parallel size) as a Hugging Face model of its family.

Reads the fp32 master weights from the per-rank optimizer state files (framework/checkpoint/zero_reader.py), one
layer at a time, and writes safetensors shards that stock transformers 5 loads (`AutoModelForCausalLM.from_pretrained`),
with config.json from the tag directory (its dtype set to the output's) and the tokenizer files from `TAG/tokenizer/`.
No GPU, no process group and no DeepSpeed import needed. DeepSpeed's own zero_to_fp32.py cannot read these checkpoints
(it assumes one partition count for every parameter; experts are partitioned over expert-data-parallel groups).

    python tools/ds_to_hf.py --checkpoint ckpt/run1 --output hf/run1 [--tag global_step1000] [--format hf|merged]
                             [--dtype bf16|fp32|fp16] [--max_shard_size 5GB] [--overwrite]

--checkpoint: a checkpoint root (tag directories and a `latest` file naming one) or a tag directory.
--format hf (default): the hub's per-expert tensors in the family's spelling (Qwen3-MoE
`mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight`); merged:
transformers 5 fused `mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I]. --dtype defaults to
the training dtype recorded in the checkpoint. The output appears atomically (written to OUT.tmp-<pid>, renamed at
the end).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # 2 MB pages for the layer-sized buffers (see moe_merge.py)

import torch  # noqa: E402

from framework.checkpoint import hf_layout as hl  # noqa: E402
from framework.checkpoint.atomic_dir import atomic_output_dir, check_output_path  # noqa: E402
from framework.checkpoint.cli import format_bytes, run_cli  # noqa: E402
from framework.checkpoint.expert_geometry import CONFIG_NAME, ExpertGeometry, read_expert_geometry  # noqa: E402
from framework.checkpoint.hf_reader import PROJS  # noqa: E402
from framework.checkpoint.hf_writer import ShardedWriter, copy_non_weight_files  # noqa: E402
from framework.checkpoint.zero_reader import ZeroCheckpointReader, resolve_tag_dir  # noqa: E402

FORMATS = {"hf": hl.PER_EXPERT, "merged": hl.FUSED}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
TOKENIZER_DIR = "tokenizer"
EXTRA_FILES = ("generation_config.json",)  # copied from the tag directory when the trainer wrote them
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def write_order(names: list[str]) -> list[tuple[int | None, list[str]]]:
    """(layer, names) in file order: embeddings, then each layer's parameters, then the rest (final norm, lm_head)."""
    head, tail, layers = [], [], {}
    for name in names:
        m = _LAYER_RE.search(name)
        if m:
            layers.setdefault(int(m[1]), []).append(name)
        else:
            (head if "embed" in name else tail).append(name)
    return [(None, head)] + [(layer, layers[layer]) for layer in sorted(layers)] + [(None, tail)]


def check_config(reader: ZeroCheckpointReader, tag_dir: str) -> tuple[dict, ExpertGeometry]:
    """config.json of the tag directory and its expert geometry, checked against the checkpoint's expert tensors."""
    cfg = read_expert_geometry(tag_dir)
    experts = {}
    for name, info in reader.params.items():
        m = _EXPERT_RE.match(name)
        if info.expert != bool(m):
            raise ValueError(f"{tag_dir}: parameter {name} is {'' if info.expert else 'not '}an expert parameter in "
                             f"meta.json but its name says otherwise")
        if m:
            experts.setdefault(int(m["layer"]), {})[m["proj"]] = info.shape
    if sorted(experts) != sorted(cfg.moe_layers):
        raise ValueError(f"{cfg.source} disagrees with the checkpoint: MoE layers {list(cfg.moe_layers)} in the "
                         f"config, experts for layers {sorted(experts)} in the checkpoint")
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_width
    for layer, shapes in experts.items():
        for proj, expected in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
            if tuple(shapes.get(proj, ())) != expected:
                raise ValueError(f"{cfg.source} disagrees with the checkpoint: layer {layer} {proj} has shape "
                                 f"{list(shapes.get(proj, ()))}, the config implies {list(expected)} (experts, "
                                 "hidden size, expert width)")
    with open(os.path.join(tag_dir, CONFIG_NAME)) as f:
        return json.load(f), cfg


def export(checkpoint: str, output: str, tag: str | None = None, fmt: str = "hf", dtype: str | None = None,
           max_shard_size: str = "5GB", overwrite: bool = False, log=None) -> dict:
    """Write the HF model directory `output`; returns a summary dict. One-line ValueError / OSError on bad input."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected bf16, fp32 or fp16")
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    tag_dir = resolve_tag_dir(checkpoint, tag)
    check_output_path(output, overwrite, (tag_dir,))  # before reading anything large
    layout = FORMATS[fmt]
    with ZeroCheckpointReader(tag_dir) as reader:
        out_dtype = DTYPES[dtype] if dtype is not None else DTYPES.get(reader.dtype)
        if out_dtype is None:
            raise ValueError(f"{tag_dir}: meta.json dtype {reader.dtype!r} is not one of bf16 / fp32 / fp16; pass "
                             "--dtype")
        config, cfg = check_config(reader, tag_dir)
        written_name = cfg.written_name(layout)  # the family's hub spelling for --format hf
        config["dtype"] = DTYPE_NAMES[out_dtype]
        if "torch_dtype" in config:
            config["torch_dtype"] = DTYPE_NAMES[out_dtype]
        order = write_order(reader.names)
        with atomic_output_dir(output, overwrite, (tag_dir,)) as tmp:
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
            copied = [CONFIG_NAME]
            tok = os.path.join(tag_dir, TOKENIZER_DIR)
            if os.path.isdir(tok):
                copied += copy_non_weight_files(tok, tmp)
            for name in EXTRA_FILES:
                if os.path.isfile(os.path.join(tag_dir, name)):
                    shutil.copy2(os.path.join(tag_dir, name), os.path.join(tmp, name))
                    copied.append(name)
            writer = ShardedWriter(tmp, max_shard_size, {"expert_layout": layout})
            try:
                for layer, names in order:
                    for param in names:
                        _write_param(writer, param, reader.read(param), out_dtype, layout, written_name)
                    reader.release()  # unmap what this layer paged in
                    if layer is not None:
                        log(f"layer {layer}: {len(names)} parameter(s) exported")
                # persistent buffers (DeepSeek-V3's e_score_correction_bias) in their saved dtype: transformers keeps
                # the bias fp32 whatever the model's dtype
                for name, buf in reader.buffers().items():
                    writer.add(name, buf.clone())
                index = writer.close()
            except BaseException:
                writer.abort()
                raise
    return {"tag_dir": tag_dir, "output": output, "layout": layout, "dtype": DTYPE_NAMES[out_dtype],
            "zero_stage": reader.zero_stage, "world_size": reader.world_size, "ep_size": reader.ep_size,
            "num_tensors": len(index["weight_map"]), "num_shards": len(set(index["weight_map"].values())),
            "total_size": writer.total_size, "copied_files": copied, "seconds": time.perf_counter() - start}


def _write_param(writer: ShardedWriter, name: str, full: torch.Tensor, dtype: torch.dtype, layout: str,
                 stored_name: Callable[[str], str]) -> None:
    """Add one parameter (fp32, owning its storage) in `dtype` under `stored_name(name)`; experts split per expert
    for the hub layout. Every tensor handed to the writer owns its storage (safetensors refuses tensors that share
    memory)."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.dtype != dtype else t.clone()

    m = _EXPERT_RE.match(name)
    if m is None or layout == hl.FUSED:
        writer.add(stored_name(name), full.to(dtype))
        return
    if m["proj"] == "gate_up_proj":
        inter = full.shape[1] // 2
        for e in range(full.shape[0]):
            writer.add(stored_name(hl.per_expert_key(m["prefix"], e, PROJS[0])), own(full[e, :inter]))
            writer.add(stored_name(hl.per_expert_key(m["prefix"], e, PROJS[1])), own(full[e, inter:]))
    else:
        for e in range(full.shape[0]):
            writer.add(stored_name(hl.per_expert_key(m["prefix"], e, PROJS[2])), own(full[e]))


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint root (with `latest`) or a tag directory")
    p.add_argument("--tag", default=None, help="tag directory under --checkpoint (default: the one `latest` names)")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", default="hf", help="hf (per-expert tensors, the hub's layout) or merged (fused)")
    p.add_argument("--dtype", default=None, help="bf16, fp32 or fp16 (default: the training dtype)")
    p.add_argument("--max_shard_size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    r = export(args.checkpoint, args.output, args.tag, args.format, args.dtype, args.max_shard_size, args.overwrite,
               log)
    print(f"exported ZeRO-{r['zero_stage']} checkpoint (world {r['world_size']}, ep {r['ep_size']}) {r['tag_dir']} -> "
          f"{r['output']}: {r['num_tensors']} tensors ({r['layout']}, {r['dtype']}), {format_bytes(r['total_size'])} "
          f"in {r['num_shards']} shard(s), {len(r['copied_files'])} other file(s), {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "ds_to_hf"))
