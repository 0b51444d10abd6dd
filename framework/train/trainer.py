"""The training run, pretraining or fine-tuning (RunPlan.task): build everything from a RunConfig, train on the
DeepSpeed engine, log, save, resume, export.

Owns: the order of start-up (distributed, groups, tokenizer, data, model, engine, resume), the step loop with gradient
accumulation, evaluation, and when checkpoints and the export happen. What each piece does lives in its own module:
config (framework/config), data (framework/data), model (framework/models), EP (framework/parallel), DeepSpeed
(framework/zero), metrics / checkpoints / export (framework/train).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import yaml

from framework.checkpoint.integrity import DATA_STATE_NAME
from framework.checkpoint.run_checkpoints import (CheckpointManager, estimate_checkpoint_bytes, latest_tag, rng_state,
                                                  set_rng_state)
from framework.cluster.process_group import init_deepspeed_distributed
from framework.config.deepspeed import build_ds_config
from framework.config.load import ConfigError
from framework.config.plan import RunPlan, data_cache_dir
from framework.data.chat_dataset import ChatData
from framework.data.chat_rows import ChatRows
from framework.data.packing import IGNORE_INDEX
from framework.data.samples import RandomRows, StepBatchLoader, default_num_streams, packed_rows
from framework.models.registry import moe_shape
from framework.train.errors import NonFiniteLoss
from framework.train.flops import flops_per_token, peak_tflops
from framework.train.metrics import MetricsWriter, WindowMeter, peak_memory_gb
from framework.train.schedule import LRSchedule



@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Runtime:
    """torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU. A plain `python launch/pretrain.py` (no
    launcher) runs as a world of one."""
    # DeepSpeed calls collectives that newer torch marks deprecated, once per step: noise, not news, in a training log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        init_deepspeed_distributed("nccl")
    else:
        device = torch.device("cpu")
        init_deepspeed_distributed("gloo")
    return Runtime(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: FRAMEWORK_FAULT=mid_save:4 SIGKILLs every rank at that point."""
    if os.environ.get("FRAMEWORK_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Fault injection for the divergence test: FRAMEWORK_FAULT=nan_loss:3 makes step 3's loss nan on every rank."""
    return loss * float("nan") if os.environ.get("FRAMEWORK_FAULT") == f"nan_loss:{step}" else loss


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many labelled tokens of a micro batch the loss counts (it shifts the labels by one: the first label of each
    row is never read)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


class Trainer:
    def __init__(self, plan: RunPlan, ds_user: dict[str, Any] | None = None, ds_source: str = "DeepSpeed config"):
        import framework  # noqa: PLC0415
        from framework.data import PackedDataLoader, build_demo_corpus, load_tokenizer  # noqa: PLC0415
        from framework.parallel.expert_parallel import expert_placement  # noqa: PLC0415
        from framework.parallel.groups import init_parallel_groups  # noqa: PLC0415
        from framework.zero.engine import initialize  # noqa: PLC0415

        self.plan = plan
        self.cfg = cfg = plan.cfg
        self.rt = rt = init_distributed()
        if rt.world_size != plan.world_size:
            raise RuntimeError(f"the run plan was resolved for {plan.world_size} processes, this job has "
                               f"{rt.world_size}")
        self.dtype = plan.dtype
        self.gas = plan.gas
        self.output_dir = os.path.abspath(cfg.train.output_dir)
        self.ckpt = CheckpointManager(self.output_dir, cfg.train.keep_last, rt.rank)
        if rt.rank == 0:
            for line in plan.warnings:
                print(line, file=sys.stderr, flush=True)
            for line in plan.notes:
                print(line, flush=True)

        self.tokenizer_dir = plan.tokenizer_dir
        if plan.task == "finetune":
            from framework.config.plan import chat_tokenizer  # noqa: PLC0415

            self.tokenizer = chat_tokenizer(cfg)  # with chat.template applied: checkpoints and the export keep it
        else:
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if rt.rank == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            self.ckpt.remove_stale_temporaries()
            if plan.task == "finetune" and cfg.chat.template is not None:
                self.tokenizer.save_pretrained(os.path.join(self.output_dir, "tokenizer"))
        if plan.task == "finetune" and cfg.chat.template is not None:
            self.tokenizer_dir = os.path.join(self.output_dir, "tokenizer")  # what the export copies
        dist.barrier()
        cache_dir = data_cache_dir(cfg)
        paths = list(cfg.data.paths)
        if cfg.data.use_demo_corpus and plan.task == "pretrain":
            if rt.rank == 0:
                build_demo_corpus(cache_dir)
            dist.barrier()
            paths.append(build_demo_corpus(cache_dir))
        hf_config = plan.hf_config
        if len(self.tokenizer) > hf_config.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer_dir} has {len(self.tokenizer)} tokens but the model's "
                              f"vocab_size is {hf_config.vocab_size}; raise model vocab_size or use another tokenizer")
        # the checkpoint's data position (the plan read it); None: a fresh run, or a resume whose data changed
        self.data_state = None if plan.resume is None or plan.restart_data else plan.resume.data_state
        self.loader = self._train_loader(paths, cache_dir, hf_config.vocab_size)
        self.eval_loader = None
        if cfg.data.eval_paths and plan.task == "finetune":
            # one stream in file order: the same rows on any number of processes, restarted for every evaluation
            self.eval_rows = self._chat_rows(list(cfg.data.eval_paths), "data.eval_paths", 1, shuffle=False)
        elif cfg.data.eval_paths:
            self.eval_loader = PackedDataLoader(list(cfg.data.eval_paths), self.tokenizer, seq_len=cfg.data.seq_len,
                                                micro_batch_size=cfg.train.micro_batch_size, dp_rank=rt.rank,
                                                dp_world=rt.world_size, seed=0, shuffle=False,
                                                text_field=cfg.data.text_field, cache_dir=cache_dir)
            self.eval_start = self.eval_loader.state_dict()
        self.ds_config = build_ds_config(cfg, rt.world_size, self.dtype == torch.bfloat16, ds_user, ds_source,
                                         hf_config)
        if rt.rank == 0:
            zero = self.ds_config["zero_optimization"]
            print(f"DeepSpeed: ZeRO-{zero['stage']}, " + ", ".join(
                f"{k}={v:.3g}" for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "stage") + f" (resolved JSON: {os.path.join(self.output_dir, 'ds_config.json')})", flush=True)
        self.groups = init_parallel_groups(cfg.parallel.ep_size, moe_shape(hf_config)[1])  # Mixtral: num_local_experts
        torch.manual_seed(cfg.train.seed)
        # ZeRO-1/2 with EP: the blocks are built as DeepSpeed MoE layers (framework/zero/deepspeed_moe.py)
        placement = expert_placement(self.groups, self.ds_config["zero_optimization"]["stage"], cfg.parallel.ep_chunks)
        model = framework.load_model(plan.model_source, backend=cfg.moe.backend, dtype=self.dtype, device=rt.device,
                                     attn_implementation=cfg.model.attn_implementation,
                                     aux_loss_coef=cfg.moe.aux_loss_coef, z_loss_coef=cfg.moe.z_loss_coef,
                                     aux_loss_scope=cfg.moe.aux_loss_scope,
                                     activation_checkpointing=cfg.train.activation_checkpointing,
                                     loss_chunk_tokens=cfg.train.loss_chunk_tokens, seed=cfg.train.seed,
                                     placement=placement,
                                     router_bias_update_rate=cfg.model.router_bias_update_rate)
        self.flops_per_token = flops_per_token(model.config, cfg.data.seq_len)
        self.peak_tflops = cfg.train.peak_tflops or peak_tflops(rt.device)
        self.schedule = LRSchedule(cfg.train.lr_schedule, cfg.train.max_steps, cfg.train.warmup_steps,
                                   cfg.train.min_lr_ratio)
        self.engine, *_ = initialize(model, self.ds_config, self.groups,
                                     lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.schedule))
        self.model = model
        self.balancer = None  # auxiliary-loss-free balancing: the routers' selection biases move after each step
        if model.options.router_bias_update_rate:
            from framework.moe.bias_balancing import RouterBiasBalancer  # noqa: PLC0415

            self.balancer = RouterBiasBalancer(model, model.options.router_bias_update_rate)
        self.step = 0
        if plan.resume is not None:
            self._resume(plan.resume.root, plan.resume.tag)
        if rt.rank == 0:
            self._write_run_files()
        # metrics.jsonl never mixes runs: any record after the step this run starts from is another run's
        self.metrics = MetricsWriter(self.output_dir, rt.rank == 0, cfg.train.tensorboard,
                                     self.step if plan.resume is not None or cfg.train.resume else None)

    def _chat_data(self, paths: list[str] | None = None, key: str = "data.paths") -> ChatData:
        """Tokenised conversations (built before training by each machine's first process: the plan's check)."""
        from framework.config.plan import prepare_chat_data  # noqa: PLC0415

        if self.rt.local_rank == 0:  # found as built by the plan, or built now (a plan resolved without the check)
            path, _ = prepare_chat_data(self.cfg, self.tokenizer, paths, key)
        dist.barrier()
        if self.rt.local_rank != 0:
            path, _ = prepare_chat_data(self.cfg, self.tokenizer, paths, key)  # finds it: the same key everywhere
        return ChatData(path)

    def _chat_rows(self, paths: list[str] | None = None, key: str = "data.paths", streams: int | None = None,
                   shuffle: bool | None = None) -> ChatRows:
        """Packed rows of the training data (default) or of `paths` (evaluation)."""
        cfg = self.cfg
        data = self._chat_data(paths, key)
        saved = self.data_state if paths is None else None
        if streams is None:
            streams = saved["num_streams"] if saved and "num_streams" in saved else \
                default_num_streams(cfg.train.global_batch_size, data.num_conversations)
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        try:
            rows = ChatRows(data, cfg.data.seq_len, streams, cfg.train.seed,
                            cfg.data.shuffle if shuffle is None else shuffle, pad_id, cfg.chat.overlong)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        if self.rt.rank == 0:
            print(f"{key}: {rows.summary()}", flush=True)
        return rows

    def _train_loader(self, paths: list[str], cache_dir: str, vocab_size: int) -> StepBatchLoader:
        cfg, rt = self.cfg, self.rt
        if self.plan.task == "finetune":
            rows = self._chat_rows()
        elif cfg.data.synthetic:
            rows = RandomRows(vocab_size, cfg.data.seq_len, cfg.train.seed)
        else:
            from framework.data.sources import open_corpus  # noqa: PLC0415

            corpus = open_corpus(paths, cfg.data.text_field, cache_dir)
            saved = self.data_state
            streams = saved["num_streams"] if saved and "num_streams" in saved else \
                default_num_streams(cfg.train.global_batch_size, corpus.num_docs)
            rows = packed_rows(corpus, self.tokenizer, cfg.data.seq_len, streams, cfg.train.seed, cfg.data.shuffle)
        loader = StepBatchLoader(rows, cfg.train.global_batch_size, cfg.train.micro_batch_size, rt.rank,
                                 rt.world_size)
        if self.data_state is not None:
            try:
                loader.load_state(self.data_state)
            except ValueError as e:
                raise ConfigError(f"resume: {self.plan.resume.path}: {e}") from None
        return loader

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        with open(os.path.join(self.output_dir, "ds_config.json"), "w") as f:
            json.dump(self.ds_config, f, indent=2)
        with open(os.path.join(self.output_dir, "run_config.yaml"), "w") as f:
            yaml.safe_dump(self.cfg.model_dump(), f, sort_keys=False)

    def save(self) -> str:
        from framework.checkpoint.engine_state import save_engine_checkpoint  # noqa: PLC0415
        from framework.checkpoint.live_export import hf_config_dict  # noqa: PLC0415

        step, rank = self.step, self.rt.rank
        # disk: every rank stops here together (DiskFull) rather than one of them failing halfway through the write
        self.ckpt.check_free_space(
            step, lambda: estimate_checkpoint_bytes(self.engine.module, self.cfg.parallel.ep_size, self.dtype))

        positions: list[dict] = [None] * self.rt.world_size  # type: ignore[list-item]
        dist.all_gather_object(positions, self.loader.local_positions())
        data_state = self.loader.global_state(positions)

        def write_rank_files(directory: str) -> None:
            torch.save({"step": step, "rng": rng_state(), "world_size": self.rt.world_size},
                       os.path.join(directory, f"trainer_state_rank{rank}.pt"))

        def write_shared_files(directory: str) -> None:
            with open(os.path.join(directory, "config.json"), "w") as f:
                json.dump(hf_config_dict(self.model.config), f, indent=2, sort_keys=True)
            with open(os.path.join(directory, "run_config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg.model_dump(), f, sort_keys=False)
            self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
            with open(os.path.join(directory, DATA_STATE_NAME), "w") as f:
                json.dump(data_state, f)
            _fault_point("mid_save", step)

        return self.ckpt.save(step, lambda root, tag: save_engine_checkpoint(self.engine, self.groups, root, tag,
                                                                              {"step": step}),
                              write_rank_files, write_shared_files)

    def _resume(self, root: str, tag: str) -> None:
        """Weights and optimizer state (resharded when the layout changed), then this run's hyperparameters and
        schedule at the resumed step, the data position and, on an unchanged layout, each rank's RNG state."""
        from framework.checkpoint.engine_state import load_engine_checkpoint  # noqa: PLC0415
        from framework.zero.engine import set_hyperparameters  # noqa: PLC0415

        client = load_engine_checkpoint(self.engine, self.groups, root, tag)
        self.step = int(client["step"])
        t = self.cfg.train
        set_hyperparameters(self.engine, t.lr, self.schedule, self.step, (t.adam_beta1, t.adam_beta2), t.adam_eps,
                            t.weight_decay, t.grad_clip)
        state_path = os.path.join(root, tag, f"trainer_state_rank{self.rt.rank}.pt")
        if os.path.exists(state_path):
            state = torch.load(state_path, weights_only=False)
            if state.get("world_size") == self.rt.world_size:
                set_rng_state(state["rng"])
        if self.rt.rank == 0:
            print(f"resumed from {os.path.join(root, tag)} at step {self.step}", flush=True)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _batch(self, loader) -> dict[str, torch.Tensor]:
        return {k: v.to(self.rt.device, non_blocking=True) for k, v in next(loader).items()}

    def evaluate(self) -> dict[str, float]:
        if self.plan.task == "finetune":
            return self._evaluate_chat()
        self.eval_loader.load_state_dict(self.eval_start)  # the same batches every evaluation
        self.engine.eval()
        total = torch.zeros((), device=self.rt.device)
        with torch.no_grad():
            for _ in range(self.cfg.train.eval_batches):
                b = self._batch(self.eval_loader)
                out = self.engine(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
                total += out.lm_loss.float()
        self.engine.train()
        dist.all_reduce(total)
        loss = total.item() / (self.cfg.train.eval_batches * self.rt.world_size)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def _evaluate_chat(self) -> dict[str, float]:
        """Mean loss per assistant token over the first train.eval_batches x micro_batch_size x processes packed rows
        of data.eval_paths, in file order: one stream (so the rows do not depend on the number of processes), the same
        rows every evaluation."""
        cfg, rt = self.cfg, self.rt
        self.eval_rows.seek({})  # from the start
        per_step = cfg.train.micro_batch_size * rt.world_size
        loader = StepBatchLoader(self.eval_rows, per_step, cfg.train.micro_batch_size, rt.rank, rt.world_size)
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # summed token loss, labelled tokens
        with torch.no_grad():
            for _ in range(cfg.train.eval_batches):
                b = self._batch(loader)
                count = _labelled_tokens(b)
                out = self.engine(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
                total += torch.stack([out.lm_loss.double() * count, count.double()])
        self.engine.train()
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp_min(1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def train(self) -> None:
        cfg, rt = self.cfg, self.rt
        tokens_per_micro = cfg.train.micro_batch_size * cfg.data.seq_len
        meter = WindowMeter(rt.device)
        bar = None
        if rt.rank == 0 and cfg.train.progress_bar:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        profiler = None
        if cfg.train.profile_steps:  # imported only when asked for: nothing changes for runs without it
            from framework.train.profiling import StepProfiler  # noqa: PLC0415

            profiler = StepProfiler(cfg.train.profile_steps, self.output_dir, rt.rank, rt.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        while self.step < cfg.train.max_steps:
            if profiler is not None:
                profiler.step_begin(self.step + 1)
            self.step_lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on after it)
            skip = any(first <= self.step + 1 <= last for first, last in cfg.train.skip_data_steps)
            batches = [self._batch(self.loader) for _ in range(self.gas)]  # the whole step's, to count its labels
            weights = [] if skip else self._token_weights(batches)
            for b, weight in zip(batches, weights):
                out = self.engine(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
                # the micro batch's summed token loss over the step's labelled tokens (see _token_weights)
                lm_loss = out.lm_loss * weight
                loss = _fault_loss(out.loss + (lm_loss - out.lm_loss), self.step + 1)
                self.engine.backward(loss)
                self.engine.step()
                meter.add_micro_batch(loss, lm_loss, out.aux_loss, out.router_stats, tokens_per_micro)
                nonfinite |= ~torch.isfinite(loss.detach())  # no host sync here: checked at logs and saves
                if self.balancer is not None:
                    self.balancer.accumulate(out.router_stats)
            if self.balancer is not None and not skip:
                self.balancer.step()  # after the step's optimizer update, on the whole global batch's load
            self.step += 1
            if profiler is not None and (written := profiler.step_end(self.step)):
                self._print(bar, f"step {self.step}: profile of steps {cfg.train.profile_steps} written to {written}")
            last = self.step == cfg.train.max_steps
            if skip:
                self._print(bar, f"step {self.step}: its batches read and dropped (train.skip_data_steps), no update")
            else:
                meter.steps += 1
            if (self.step % cfg.train.log_steps == 0 or last) and meter.steps:
                self._log(meter, bar)
                meter.reset()
                self._stop_if_nonfinite(nonfinite)
            if cfg.train.eval_steps and (self.step % cfg.train.eval_steps == 0 or last):
                record = {"step": self.step, **self.evaluate()}
                self.metrics.write(record)
                self._print(bar, f"step {self.step}: eval loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}")
            if (cfg.train.save_steps and self.step % cfg.train.save_steps == 0) or (last and cfg.train.save_at_end):
                self._stop_if_nonfinite(nonfinite)
                path = self.save()
                self._print(bar, f"step {self.step}: saved {path}")
                _fault_point("after_save", self.step)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if cfg.export.at_end:
            self.export(os.path.join(self.output_dir, "hf"))
        self.metrics.close()
        dist.barrier()  # every rank leaves together: none exits while a peer still talks to it

    def _token_weights(self, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per-token loss normalisation over the whole global batch (README "Loss normalisation"), for pretraining
        and fine-tuning alike: the model's lm_loss is the mean over one micro batch's n_k labelled tokens; the step
        must minimise the sum over every labelled token of the global batch divided by their number N (all ranks,
        all micro batches). DeepSpeed divides each backward by the accumulation steps and averages gradients over
        the ranks, so micro batch k's mean is weighted by n_k x gas x world / N. (A mean of per-micro-batch means
        would weight a token of a micro batch with few assistant tokens more than one of a full one.) One small
        all-reduce per step, of counts known before any forward."""
        counts = torch.stack([_labelled_tokens(b) for b in batches]).to(torch.float64)
        total = counts.sum()
        if self.rt.world_size > 1:
            dist.all_reduce(total)
        scale = self.gas * self.rt.world_size / total.clamp_min(1)
        return [(n * scale).to(torch.float32) for n in counts]

    def _stop_if_nonfinite(self, nonfinite: torch.Tensor) -> None:
        """Raise NonFiniteLoss if any rank saw a nan/inf training loss since the run started (one small collective)."""
        if not self.cfg.train.stop_on_nonfinite_loss:
            return
        flag = nonfinite.to(torch.int32)
        if self.rt.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            last = latest_tag(self.ckpt.root)
            kept = f"the last checkpoint is {os.path.join(self.ckpt.root, last)}" if last else "no checkpoint exists"
            first = int(last.rsplit("_", 1)[1]) + 1 if last else 1  # tags are step_<N>
            raise NonFiniteLoss(
                f"step {self.step}: the training loss is nan or inf (see {self.metrics.path}); stopped before saving, "
                f"{kept}; resume (--resume auto) with train.skip_data_steps=[[{first},{self.step}]] to pass over "
                "these steps' batches, or with a lower train.lr; train.stop_on_nonfinite_loss=false goes on instead")

    def _log(self, meter: WindowMeter, bar) -> None:
        record = meter.window_record(self.rt.world_size)
        elapsed = record.pop("elapsed_s")
        tokens_per_s = meter.tokens / elapsed
        norm = self.engine.get_global_grad_norm()
        memory = torch.tensor(peak_memory_gb(self.rt.device), device=self.rt.device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)  # EP ranks differ (routing): report the fullest GPU
        record = {"step": self.step, **record, "lr": self.step_lr,
                  "grad_norm": float(norm) if norm is not None else None,
                  "tokens_per_s_per_gpu": round(tokens_per_s, 1),
                  "tflops_per_gpu": round(tokens_per_s * self.flops_per_token / 1e12, 3),
                  "mfu": round(tokens_per_s * self.flops_per_token / 1e12 / self.peak_tflops, 4)
                  if self.peak_tflops else None,
                  "mem_gb": round(memory.item(), 2), "time": time.time()}
        self.metrics.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self._print(bar, f"step {self.step}: loss {record['loss']:.4f} (lm {record['lm_loss']:.4f}, aux "
                         f"{record['aux_loss']:.4f}) lr {record['lr']:.2e} grad norm "
                         + (f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "-") + " | "
                         f"{record['tokens_per_s_per_gpu']:.0f} tok/s/GPU {record['tflops_per_gpu']:.1f} TFLOP/s/GPU"
                         f" | mem {record['mem_gb']:.1f} GB"
                         + (f" | expert load max/mean {record['expert_load_max_over_mean']}"
                            if record.get("expert_load_max_over_mean") else ""))

    def _print(self, bar, text: str) -> None:
        if self.rt.rank != 0:
            return
        if bar is not None:
            bar.write(text)
        else:
            print(text, flush=True)

    def export(self, out: str) -> None:
        from framework.checkpoint.live_export import export_live  # noqa: PLC0415

        export_live(self.engine.module, self.groups, out, self.cfg.export.format, self.dtype, self.tokenizer_dir,
                    self.cfg.export.max_shard_size)
        self._print(None, f"exported Hugging Face model to {out} ({self.cfg.export.format} format)")
