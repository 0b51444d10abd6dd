"""The run configuration: typed sections of the YAML that `launch/pretrain.py` and `launch/finetune.py` read.

Owns: every key a user may write, its type, default and range. Unknown keys are errors (a typo must not silently
train with a default). Cross-key arithmetic that needs the world size lives in framework/config/load.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # An HF checkpoint directory (weights + config.json: fine-tuning / continued pretraining) or a directory or file
    # holding only config.json (random initialisation). Exactly one of `path` and `hf_config` must be given.
    path: str | None = None
    hf_config: dict[str, Any] | None = None  # inline config.json fields (random init); model_type picks the family
    num_layers: int | None = Field(None, ge=1)  # keep only the first N layers (reduced-depth runs at real widths)
    tokenizer: str | None = None  # default: model.path when it holds a tokenizer, else the tokenizer we ship
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    # auto: flash varlen over packed documents on CUDA (torch >= 2.10), else sdpa with a block-diagonal mask
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager"] = "auto"
    # > 0: auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step every router's selection bias moves
    # by this much towards balance, bias_e += rate * sign(mean load - load_e) over the global batch; 0: off. Only
    # families whose routers have the bias (deepseek_v3; the paper used 0.001).
    router_bias_update_rate: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.path is None) == (self.hf_config is None):
            raise ValueError("set exactly one of model.path (an HF checkpoint or config dir) and model.hf_config")
        return self


class DataSection(Section):
    paths: list[str] = Field(default_factory=list)  # files or folders: jsonl, parquet, txt/md, datasets.save_to_disk
    use_demo_corpus: bool = False  # train on the small corpus built locally from Python's own docstrings
    synthetic: bool = False  # uniform random token ids, one document per row: throughput runs only (no corpus)
    eval_paths: list[str] = Field(default_factory=list)
    text_field: str = "text"
    seq_len: int = Field(2048, ge=8)
    shuffle: bool = True
    cache_dir: str | None = None  # tokenised-data cache; default OUTPUT_DIR/data_cache


class TrainSection(Section):
    output_dir: str = "runs/default"
    max_steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(1, ge=1)  # sequences per GPU per forward
    global_batch_size: int = Field(8, ge=1)  # sequences per optimizer step over all GPUs
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # final lr of cosine/linear decay, as a fraction of lr
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    # true: recompute every decoder layer in backward (keeps only each layer's input). "moe": recompute only the MoE
    # (or dense MLP) half of each layer, its all-to-alls included, and keep attention's activations; "attention":
    # recompute only the attention half. The selective modes cost part of full recompute's time and part of its
    # memory saving (tools/tune_zero.py estimate prints all four).
    activation_checkpointing: bool | Literal["moe", "attention"] = False
    # > 0: LM head + cross-entropy this many tokens at a time, gradients computed in the forward pass (the fp32
    # [B, S, vocab] logits never exist; Qwen3's 151,936-token vocabulary makes them 2.5 GB per 4096 tokens; faster
    # too: framework/ops/linear_cross_entropy.py). 0: all at once, the model returns the logits.
    loss_chunk_tokens: int = Field(4096, ge=0)
    seed: int = 0
    log_steps: int = Field(10, ge=1)
    save_steps: int = Field(0, ge=0)  # 0: no periodic saves
    save_at_end: bool = True
    keep_last: int = Field(2, ge=1)  # checkpoints kept on disk (older ones are deleted after a newer one is complete)
    eval_steps: int = Field(0, ge=0)  # 0: no evaluation
    eval_batches: int = Field(8, ge=1)  # micro batches per rank per evaluation
    resume: str | None = None  # "auto" (newest checkpoint in output_dir, if any) or a checkpoint directory
    # Keys a resume may change although they change what the run trains on (framework/config/plan.py MEANING_KEYS:
    # num_experts_per_tok, data.seq_len, data.paths, model.tokenizer, ...); the resume refuses them otherwise.
    allow_resume_changes: list[str] = Field(default_factory=list)
    peak_tflops: float | None = Field(None, gt=0)  # per-GPU dense bf16 peak for MFU; default: known from the device
    tensorboard: bool = True
    progress_bar: bool = True
    # Stop (exit 1, one line naming the step) at the next log or save once a training loss is nan/inf, before
    # anything is saved: no checkpoint of a diverged run replaces a good one. false: go on (DeepSpeed skips bf16
    # steps whose gradients are not finite).
    stop_on_nonfinite_loss: bool = True
    # [first, last]: torch-profile these optimizer steps (1-based, as logged) into OUTPUT_DIR/profile; []: off
    profile_steps: list[int] = Field(default_factory=list)
    # [[first, last], ...]: read and drop the batches of these optimizer steps without training on them (no forward,
    # no update; the step count moves on). For resuming from a checkpoint before a loss spike or a nan without
    # feeding the same batches again; by step number, so a later resume with the same setting skips nothing twice.
    skip_data_steps: list[list[int]] = Field(default_factory=list)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_mode(cls, value: Any) -> bool | str:
        # one message for the four values instead of pydantic's two (one per member of the union)
        words = {"true": True, "on": True, "false": False, "off": False, "moe": "moe", "attention": "attention"}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise ValueError("expected true, false, moe or attention")

    @field_validator("allow_resume_changes")
    @classmethod
    def _known_meaning_keys(cls, keys: list[str]) -> list[str]:
        from framework.config.plan import MEANING_KEYS  # noqa: PLC0415

        unknown = [k for k in keys if k not in MEANING_KEYS]
        if unknown:
            raise ValueError(f"{unknown[0]} is not a key that needs it; expected some of {', '.join(MEANING_KEYS)}")
        return keys

    @field_validator("profile_steps")
    @classmethod
    def _profile_window(cls, steps: list[int]) -> list[int]:
        if steps and not (len(steps) == 2 and 1 <= steps[0] <= steps[1]):
            raise ValueError("expected [first, last] optimizer steps with 1 <= first <= last, or [] for off")
        return steps

    @field_validator("skip_data_steps")
    @classmethod
    def _skip_ranges(cls, ranges: list[list[int]]) -> list[list[int]]:
        for r in ranges:
            if not (len(r) == 2 and 1 <= r[0] <= r[1]):
                raise ValueError(f"range {r}: expected [[first, last], ...] optimizer steps with 1 <= first <= last")
        return ranges

    @model_validator(mode="after")
    def _profile_within_run(self) -> "TrainSection":
        # a window past the end would never close, and the run would end without writing a profile
        if self.profile_steps and self.profile_steps[1] > self.max_steps:
            raise ValueError(f"train.profile_steps={self.profile_steps} ends after train.max_steps={self.max_steps}")
        return self


class MoESection(Section):
    backend: Literal["auto", "megablocks", "grouped_mm", "eager"] = "auto"
    aux_loss_coef: float | None = Field(None, ge=0)  # default: the model config's router_aux_loss_coef
    z_loss_coef: float = Field(0.0, ge=0)
    # pooled: transformers' load-balancing loss (statistics summed over layers first); per_layer: one loss per MoE
    # layer, averaged (Megatron, torchtitan), which also penalises a single layer collapsing onto a few experts.
    aux_loss_scope: Literal["pooled", "per_layer"] = "pooled"


class ParallelSection(Section):
    ep_size: int = Field(1, ge=1)
    # token chunks pipelined through each MoE layer's all-to-alls (framework/parallel/ep_dispatch.py): 2 overlaps one
    # chunk's exchanges with the other's expert compute, forward and backward; 1 exchanges all tokens at once. No
    # effect at ep_size 1. Not measured on GPUs yet, hence off by default.
    ep_chunks: int = Field(1, ge=1, le=16)
    zero_stage: Literal[0, 1, 2, 3] = 3


class ChatSection(Section):
    """Chat data for launch/finetune.py (framework/data/chat_*.py); pretraining refuses it."""

    # auto: per record, `messages_field` -> messages, `conversations_field` -> ShareGPT, `instruction_field` -> Alpaca
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    messages_field: str = "messages"  # [{role, content, ...}], roles system, user, assistant, tool
    role_field: str = "role"
    content_field: str = "content"
    conversations_field: str = "conversations"  # ShareGPT: [{from, value}], from human/gpt/system/tool...
    from_field: str = "from"
    value_field: str = "value"
    instruction_field: str = "instruction"  # Alpaca: instruction (+ input) -> user, output -> assistant
    input_field: str = "input"
    output_field: str = "output"
    system_field: str = "system"  # ShareGPT / Alpaca: an optional system prompt beside the turns
    # which assistant tokens the loss is on: every assistant turn, or only each conversation's last one
    loss_on: Literal["all", "last"] = "all"
    # conversations longer than data.seq_len: keep their first seq_len tokens, or leave them out
    overlong: Literal["truncate", "drop"] = "truncate"
    # a .jinja file used instead of the tokenizer's own chat template (saved with the checkpoints and the export)
    template: str | None = None
    # passed to the template, e.g. {enable_thinking: false} for Qwen3
    template_kwargs: dict[str, Any] = Field(default_factory=dict)


class ExportSection(Section):
    at_end: bool = True  # write an HF directory to OUTPUT_DIR/hf when training finishes
    format: Literal["hf", "merged"] = "hf"  # hf: per-expert tensors as on the hub; merged: fused gate_up_proj/down_proj
    max_shard_size: str = "5GB"


class RunConfig(Section):
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    moe: MoESection = Field(default_factory=MoESection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    chat: ChatSection = Field(default_factory=ChatSection)
    export: ExportSection = Field(default_factory=ExportSection)
