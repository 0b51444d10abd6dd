"""One resolved run plan: the run config, the world size, the model and (when resuming) the checkpoint, checked together
once, before any process group, model or DeepSpeed engine exists.

Owns: every cross-check between those inputs (batch arithmetic, ep_size against the world and the experts, top-k
against the experts, the model source, data paths, the output directory, and what a resume may change), each in one
place, as one-line `ConfigError`s; and the values derived from them (the global batch when the user set none, the
gradient accumulation steps, the model dtype, the tokenizer). launch/pretrain.py (under a launcher and in the
validated multi-node launch), the trainer, tools/tune_zero.py and the ZeRO search use it.

What a resume may change (README "Resuming"):
- anything that keeps the checkpoint's shapes takes effect (lr, schedule, warmup, betas, clipping, max_steps, ...):
  `changes` lists them in one line;
- world size, ep_size, ZeRO stage and the global batch: the checkpoint is resharded, the data continues from the
  same sample (framework/data/samples.py);
- model shapes and the model dtype: refused (SHAPE_KEYS);
- keys that keep shapes but change what the run trains on (MEANING_KEYS): refused unless listed in
  train.allow_resume_changes; a changed corpus, tokenizer or data order then starts its data from the beginning.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from framework.checkpoint.integrity import DATA_STATE_NAME
from framework.config.load import ConfigError
from framework.config.schema import RunConfig, TrainSection

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# checkpoint config.json fields whose change makes the saved tensors unusable
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_local_experts",
              "mlp_only_layers", "shared_expert_intermediate_size", "qkv_bias", "attention_bias",
              "decoder_sparse_step", "tie_word_embeddings")
# keys that keep shapes but change the run's meaning; data-order keys restart the data when allowed
# every chat key decides which tokens a fine-tuning run reads, or which of them it learns
CHAT_KEYS = ("chat.format", "chat.messages_field", "chat.role_field", "chat.content_field", "chat.conversations_field",
             "chat.from_field", "chat.value_field", "chat.instruction_field", "chat.input_field", "chat.output_field",
             "chat.system_field", "chat.loss_on", "chat.overlong", "chat.template", "chat.template_kwargs")
DATA_ORDER_KEYS = ("data.paths", "data.text_field", "data.use_demo_corpus", "data.synthetic", "data.shuffle",
                   "model.tokenizer", "train.seed", *CHAT_KEYS)
MEANING_KEYS = ("num_experts_per_tok", "data.seq_len", *DATA_ORDER_KEYS)
NOT_COMPARED = ("train.resume", "train.allow_resume_changes")


@dataclass(frozen=True)
class ResumePoint:
    root: str  # the checkpoint root (OUTPUT_DIR/checkpoints or a user-given one)
    tag: str
    run_config: dict[str, Any]  # the saved run_config.yaml
    meta: dict[str, Any]  # the engine's meta.json (world_size, ep_size, zero_stage, dtype)
    # the data position (framework/data/samples.py StepBatchLoader.global_state); None: the checkpoint has none
    data_state: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)


@dataclass(frozen=True)
class RunPlan:
    cfg: RunConfig  # with derived values filled in (train.global_batch_size)
    world_size: int
    gas: int  # micro batches per optimizer step on each rank
    model_source: str | dict  # an HF checkpoint directory, or a config dict for random initialisation
    hf_config: Any  # the resolved model config (transformers PretrainedConfig)
    dtype: torch.dtype
    tokenizer_dir: str
    resume: ResumePoint | None
    restart_data: bool  # resuming with another corpus / tokenizer / data order: the data starts anew
    notes: list[str] = field(default_factory=list)  # lines to print once (rank 0, stdout)
    warnings: list[str] = field(default_factory=list)  # lines to print once (rank 0, stderr)
    # "pretrain": documents packed into rows, every token learnt; "finetune": conversations, assistant tokens learnt
    # (framework/data/chat_*.py). Chosen by the entry point (launch/pretrain.py, launch/finetune.py).
    task: str = "pretrain"


# ---------------------------------------------------------------------------------------------------------------------
# pieces


def _model_source(cfg: RunConfig) -> str | dict:
    from framework.models.load import has_weights  # noqa: PLC0415
    from framework.models.registry import family_for  # noqa: PLC0415

    if cfg.model.path is not None and not os.path.exists(cfg.model.path):
        raise ConfigError(f"model.path {cfg.model.path} does not exist")
    if cfg.model.path is not None and has_weights(cfg.model.path):
        if cfg.model.num_layers is not None:
            raise ConfigError(f"model.num_layers={cfg.model.num_layers} with model.path={cfg.model.path} holding "
                              "weights: reduced depth is for random initialisation; remove one of them")
        return cfg.model.path
    source = cfg.model.path if cfg.model.path is not None else dict(cfg.model.hf_config)
    raw = family_for(source).load_config(source).to_dict()
    if cfg.model.num_layers is not None:
        raw["num_hidden_layers"] = cfg.model.num_layers
        if "mlp_only_layers" in raw:  # Qwen3-MoE, Qwen2-MoE: Mixtral and OLMoE have no dense layers
            raw["mlp_only_layers"] = [i for i in raw["mlp_only_layers"] or [] if i < cfg.model.num_layers]
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:cfg.model.num_layers]
    for private in [k for k in raw if k.startswith("_")]:
        raw.pop(private)
    return raw


def resolve_model(cfg: RunConfig) -> tuple[str | dict, PretrainedConfig]:
    """(what load_model gets: a checkpoint path, or a config dict with model.num_layers applied; its checked config).
    One-line ConfigError for a missing path or a config that is not a supported MoE family (e.g. a dense model)."""
    from framework.models.registry import family_for  # noqa: PLC0415

    where = f"model.path {cfg.model.path}" if cfg.model.path is not None else "model.hf_config"
    try:
        source = _model_source(cfg)
        # a checkpoint's config.json is read here (a dense model stops now); a config dict carries num_layers
        return source, family_for(source).load_config(source)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None  # the registry's message names the supported model types


def model_source(cfg: RunConfig) -> str | dict:
    """resolve_model's source alone (tools that load the config their own way)."""
    return resolve_model(cfg)[0]


def resolve_dtype(cfg: RunConfig, cuda: bool | None = None) -> torch.dtype:
    import torch  # noqa: PLC0415 - here, not at the top: launch/pretrain.py --help and config errors never need it

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.dtype]


def tokenizer_dir(cfg: RunConfig) -> str:
    from framework.data import DEMO_TOKENIZER_DIR  # noqa: PLC0415

    if cfg.model.tokenizer is not None:
        return cfg.model.tokenizer
    if cfg.model.path is not None and os.path.exists(os.path.join(cfg.model.path, "tokenizer_config.json")):
        return cfg.model.path
    return DEMO_TOKENIZER_DIR


def global_batch(cfg: RunConfig, world_size: int, saved: int | None = None) -> tuple[int, str | None]:
    """train.global_batch_size as set, or, when the user set none, the saved run's (resuming, if it divides) or the
    smallest multiple of micro_batch_size x processes that is at least the default. Returns (value, note)."""
    per_step = cfg.train.micro_batch_size * world_size
    if "global_batch_size" in cfg.train.model_fields_set:
        return cfg.train.global_batch_size, None
    if saved is not None and saved % per_step == 0:
        return saved, None
    default = TrainSection.model_fields["global_batch_size"].default
    value = per_step * max(1, math.ceil(default / per_step))
    return value, (f"train.global_batch_size not set: {value} (train.micro_batch_size {cfg.train.micro_batch_size} x "
                   f"{world_size} processes x {value // per_step} accumulation steps)")


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int,
                       world_desc: str | None = None) -> int:
    """Micro batches per optimizer step on each rank; `world_desc` (e.g. `describe_world`'s) goes into the message."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        nearest = max(per_step, round(global_batch_size / per_step) * per_step)
        processes = f"{world_size} processes" + (f" ({world_desc})" if world_desc else "")
        raise ConfigError(f"train.global_batch_size ({global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({micro_batch_size}) x {processes} = {per_step}; "
                          f"e.g. train.global_batch_size={nearest}, or leave it unset to derive it")
    return global_batch_size // per_step


def check_model_parallel(ep_size: int, world_size: int, hf_config: PretrainedConfig,
                         world_desc: str | None = None) -> None:
    """`check_parallel` for a loaded config of any family, under the family's own expert fields."""
    from framework.models.registry import layout_for  # noqa: PLC0415

    layout = layout_for(hf_config)  # each family names the expert fields its own way
    _, num_experts, top_k, _ = layout.moe_shape(hf_config)
    check_parallel(ep_size, world_size, num_experts, top_k, world_desc, layout.experts_field)


def check_parallel(ep_size: int, world_size: int, num_experts: int, top_k: int | None = None,
                   world_desc: str | None = None, experts_field: str = "num_experts") -> None:
    """ep_size against the processes and the experts, top-k against the experts (the one place for both).
    `experts_field` is the config field holding the expert count (Mixtral: num_local_experts), for the messages."""
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size ({ep_size}) must be >= 1")
    if world_size % ep_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        where = f"{world_size} = {world_desc}" if world_desc else world_size
        raise ConfigError(f"parallel.ep_size ({ep_size}) must divide the number of processes ({where}); choose one "
                          f"of {divisors}")
    if num_experts % ep_size:
        raise ConfigError(f"parallel.ep_size ({ep_size}) must divide the model's {experts_field} ({num_experts})")
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise ConfigError(f"model num_experts_per_tok ({top_k}) must be between 1 and {experts_field} "
                          f"({num_experts})")


def check_data(cfg: RunConfig) -> None:
    if not cfg.data.paths and not cfg.data.use_demo_corpus and not cfg.data.synthetic:
        raise ConfigError("data.paths is empty: list jsonl/parquet/txt files or folders, or set "
                          "data.use_demo_corpus=true (or data.synthetic=true for random tokens)")
    if cfg.data.synthetic and (cfg.data.paths or cfg.data.use_demo_corpus):
        raise ConfigError("data.synthetic=true trains on random tokens: leave data.paths empty and "
                          "data.use_demo_corpus false")
    if cfg.data.paths and cfg.data.use_demo_corpus:
        # the demo configs (what runs without --config) set use_demo_corpus: files given to them would silently be
        # mixed with the demo data
        raise ConfigError("data.paths is set and data.use_demo_corpus is true (the demo config sets it): add "
                          "data.use_demo_corpus=false to train on your files alone, or give --config")
    for path in cfg.data.paths + cfg.data.eval_paths:
        if not os.path.exists(path):
            raise ConfigError(f"data: {path} does not exist")
    if cfg.train.eval_steps and not cfg.data.eval_paths:
        raise ConfigError(f"train.eval_steps={cfg.train.eval_steps} but data.eval_paths is empty")


def check_task(cfg: RunConfig, task: str) -> None:
    """What one task's data needs that the other's does not have."""
    if task == "pretrain":
        # a run_config.yaml written by any run holds the section with its defaults: only settings are refused
        if cfg.chat.model_dump() != type(cfg.chat)().model_dump():
            raise ConfigError("the chat section configures chat data for launch/finetune.py; launch/pretrain.py trains "
                              "on documents: remove it, or fine-tune with launch/finetune.py")
        return
    if task != "finetune":
        raise ValueError(f"unknown task {task!r}")
    if cfg.data.synthetic:
        raise ConfigError("data.synthetic=true is for pretraining throughput runs; fine-tuning reads conversations "
                          "(data.paths, or data.use_demo_corpus=true for the demo chat dataset)")
    if cfg.chat.template is not None and not os.path.isfile(cfg.chat.template):
        raise ConfigError(f"chat.template {cfg.chat.template} is not a file (expected a .jinja chat template)")


def check_output_dir(output_dir: str) -> None:
    """The directory (or its nearest existing parent) must be a writable directory."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"train.output_dir {output_dir} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"train.output_dir {output_dir}: {existing} is a file, not a directory")
    try:  # a real write: permissions alone miss read-only filesystems (and root passes every access check)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"train.output_dir {output_dir}: cannot write in {existing} ({e.strerror}); choose another "
                          "train.output_dir") from None


# ---------------------------------------------------------------------------------------------------------------------
# resuming


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.hf_config":
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def read_resume_point(root: str, tag: str) -> ResumePoint:
    from framework.checkpoint.zero_reader import read_meta  # noqa: PLC0415

    tag_dir = os.path.join(root, tag)
    data_state = None
    try:
        meta = read_meta(tag_dir)
        with open(os.path.join(tag_dir, "run_config.yaml")) as f:
            run_config = yaml.safe_load(f) or {}
        if os.path.exists(os.path.join(tag_dir, DATA_STATE_NAME)):
            with open(os.path.join(tag_dir, DATA_STATE_NAME)) as f:
                data_state = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {tag_dir}: cannot read the checkpoint ({e})") from None
    return ResumePoint(root, tag, run_config, meta, data_state)


def _checkpoint_model(point: ResumePoint) -> dict[str, Any]:
    path = os.path.join(point.path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {path}: cannot read the checkpoint's model config ({e})") from None


def resume_changes(cfg: RunConfig, hf_config, dtype: torch.dtype, point: ResumePoint) -> tuple[list[str], bool]:
    """Check what this run changes against the checkpoint; returns (one line per change, restart the data)."""
    from framework.checkpoint.engine_state import DTYPE_NAMES  # noqa: PLC0415

    saved_model = _checkpoint_model(point)
    now_model = hf_config.to_dict()
    shape = [f"{k} {saved_model.get(k)!r} -> {now_model.get(k)!r}" for k in SHAPE_KEYS
             if k in saved_model and saved_model.get(k) != now_model.get(k)]
    saved_dtype, now_dtype = point.meta.get("dtype"), DTYPE_NAMES.get(dtype, str(dtype))
    if saved_dtype != now_dtype:
        shape.append(f"model dtype {saved_dtype} -> {now_dtype} (model.dtype)")
    if shape:
        raise ConfigError(f"resume: {point.path} cannot load into this model: {'; '.join(shape)}; resume with the "
                          "model config it was saved with, or start a new train.output_dir")
    saved, now = _flatten(point.run_config), _flatten(cfg.model_dump())
    saved["num_experts_per_tok"] = saved_model.get("num_experts_per_tok")
    now["num_experts_per_tok"] = now_model.get("num_experts_per_tok")
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if k not in NOT_COMPARED and saved.get(k) != now.get(k) and k != "model.hf_config"
               and not (k in CHAT_KEYS and k not in saved)}  # checkpoints from before the chat section
    if saved.get("model.hf_config") != now.get("model.hf_config"):
        # shapes are equal (checked above); report the inline model fields that differ
        old, new = saved.get("model.hf_config") or {}, now.get("model.hf_config") or {}
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k) and k != "num_experts_per_tok":
                changed[f"model.hf_config.{k}"] = (old.get(k), new.get(k))
    allowed = set(cfg.train.allow_resume_changes)
    refused = [k for k in MEANING_KEYS if k in changed and k not in allowed]
    if refused:
        what = "; ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigError(f"resume: {what} changes what the run trains on; to continue anyway pass "
                          f"train.allow_resume_changes=[{', '.join(refused)}], or start a new train.output_dir")
    lines = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
    return lines, any(k in changed for k in DATA_ORDER_KEYS)


# ---------------------------------------------------------------------------------------------------------------------
# the plan


def resolve_plan(cfg: RunConfig, world_size: int, check_corpus: bool = False, world_desc: str | None = None,
                 task: str = "pretrain") -> RunPlan:
    """Check `cfg` for a run of `world_size` processes and resolve everything derived from it. Pure: reads files
    (configs, checkpoint metadata, with `check_corpus` the corpus), starts nothing. Raises ConfigError (one line).
    `world_desc` says where the processes come from (a hostfile launch: `describe_world`), for the messages.
    `task`: "pretrain" or "finetune" (chat data; with `check_corpus` every conversation is checked and tokenised
    into the cache the run reads, framework/data/chat_dataset.py)."""
    from framework.checkpoint.integrity import resolve_resume  # noqa: PLC0415
    from framework.train.errors import CheckpointError  # noqa: PLC0415

    check_task(cfg, task)
    check_data(cfg)
    check_output_dir(cfg.train.output_dir)
    source, hf_config = resolve_model(cfg)
    check_model_parallel(cfg.parallel.ep_size, world_size, hf_config, world_desc)
    from framework.models.registry import layout_for  # noqa: PLC0415

    if cfg.model.router_bias_update_rate and not layout_for(hf_config).router_selection_bias:
        raise ConfigError(f"model.router_bias_update_rate={cfg.model.router_bias_update_rate}: {hf_config.model_type} "
                          "routers have no selection bias (e_score_correction_bias); set it 0")
    dtype = resolve_dtype(cfg)
    notes: list[str] = []
    warnings: list[str] = []
    point = None
    try:  # verifies the checkpoint's files; a damaged newest one falls back with a warning
        found = resolve_resume(cfg.train.output_dir, cfg.train.resume)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError(str(e)) from None
    if found is not None:
        if found.warning:
            warnings.append(found.warning)
        point = read_resume_point(found.root, found.tag)
    saved_batch = point.run_config.get("train", {}).get("global_batch_size") if point else None
    gbs, note = global_batch(cfg, world_size, saved_batch)
    if note:
        notes.append(note)
    if gbs != cfg.train.global_batch_size:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch_size": gbs})})
    gas = accumulation_steps(gbs, cfg.train.micro_batch_size, world_size, world_desc)
    restart_data = False
    if point is not None:
        changes, restart_data = resume_changes(cfg, hf_config, dtype, point)
        if point.meta.get("world_size") != world_size:
            changes.append(f"processes {point.meta.get('world_size')} -> {world_size}")
        if changes:
            notes.append(f"resume: changed since {point.path}: {'; '.join(changes)}")
        if restart_data:
            notes.append("resume: the data changed (allowed by train.allow_resume_changes): it starts from its "
                         "beginning")
        elif point.data_state is None:
            raise ConfigError(f"resume: {os.path.join(point.path, DATA_STATE_NAME)} is missing: the checkpoint was "
                              "written before the world-size-independent data order; start a new run from its "
                              "export (tools/ds_to_hf.py)")
    if check_corpus:  # last: the slowest check, and the only one that writes (its memo / the chat token cache)
        notes = scan_data(cfg, task) + notes
    return RunPlan(cfg, world_size, gas, source, hf_config, dtype, tokenizer_dir(cfg), point, restart_data, notes,
                   warnings, task)


def scan_data(cfg: RunConfig, task: str) -> list[str]:
    """Read every training and evaluation file: one-line ConfigError for the first bad record; the chat data's
    summary lines (fine-tuning tokenises every conversation into the cache the run reads)."""
    if task == "finetune":
        from framework.data.chat_dataset import summary_lines  # noqa: PLC0415

        tokenizer = chat_tokenizer(cfg)
        _, summary = prepare_chat_data(cfg, tokenizer)
        notes = summary_lines(summary)
        if cfg.data.eval_paths:
            _, summary = prepare_chat_data(cfg, tokenizer, list(cfg.data.eval_paths), "data.eval_paths")
            notes += summary_lines(summary, "data.eval_paths")
        return notes
    from framework.data.sources import check_corpus as scan  # noqa: PLC0415

    # files that passed before (same size, time and text field) are not read again on a restart
    memo = os.path.join(data_cache_dir(cfg), "corpus_checked.json")
    if cfg.data.paths:
        scan(list(cfg.data.paths), cfg.data.text_field, cfg.data.cache_dir, memo=memo)
    if cfg.data.eval_paths:
        scan(list(cfg.data.eval_paths), cfg.data.text_field, cfg.data.cache_dir, key="data.eval_paths", memo=memo)
    return []


# ---------------------------------------------------------------------------------------------------------------------
# chat data (fine-tuning)


def data_cache_dir(cfg: RunConfig) -> str:
    """data.cache_dir, or OUTPUT_DIR/data_cache: the corpus check's memo, the demo data, the chat token cache."""
    return cfg.data.cache_dir or os.path.join(os.path.abspath(cfg.train.output_dir), "data_cache")


def chat_paths(cfg: RunConfig) -> list[str]:
    """data.paths, or the demo chat dataset (built here if missing) with data.use_demo_corpus."""
    paths = list(cfg.data.paths)
    if cfg.data.use_demo_corpus:
        from framework.data.chat_demo import build_demo_chat  # noqa: PLC0415

        paths.append(build_demo_chat(data_cache_dir(cfg)))
    return paths


def chat_tokenizer(cfg: RunConfig):
    """The run's tokenizer with the chat template it renders with (chat.template replaces the tokenizer's own)."""
    from framework.data.tokenizer import load_tokenizer  # noqa: PLC0415

    where = tokenizer_dir(cfg)
    try:
        tokenizer = load_tokenizer(where)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model.tokenizer: {e}") from None
    if cfg.chat.template is not None:
        with open(cfg.chat.template, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {where} has no chat template: fine-tuning renders conversations with it; give "
                          "one with chat.template=FILE.jinja (or use the checkpoint's own tokenizer)")
    return tokenizer


def chat_settings(cfg: RunConfig):
    from framework.data.chat_dataset import ChatSettings  # noqa: PLC0415
    from framework.data.chat_formats import ChatFields  # noqa: PLC0415

    c = cfg.chat
    fields = ChatFields(**{k: getattr(c, k) for k in ChatFields.__dataclass_fields__})
    return ChatSettings(fields, c.loss_on, dict(c.template_kwargs))


def prepare_chat_data(cfg: RunConfig, tokenizer=None, paths: list[str] | None = None,
                      key: str = "data.paths") -> tuple[str, dict]:
    """Check and tokenise chat data (`paths`, default the training data: `chat_paths`) into its cache, reused when
    unchanged; (cache directory, summary). Errors name `key`."""
    from framework.data.chat_dataset import build_chat_cache  # noqa: PLC0415

    tokenizer = tokenizer or chat_tokenizer(cfg)
    return build_chat_cache(chat_paths(cfg) if paths is None else paths, tokenizer, chat_settings(cfg),
                            data_cache_dir(cfg), key)
