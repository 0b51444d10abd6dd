"""launch/pretrain.py end to end on CPU: loss falls, resume equals an uninterrupted run, a SIGKILL in the middle of a
save leaves the previous checkpoint, and the exported HF directory (EP=2, ZeRO-3, two processes) gives stock
transformers the same eval loss the training model measured, and tools/ds_to_hf.py gives the same tensors from the checkpoint."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from framework.cluster.process_group import SHM_DIR, SHM_PREFIX
from tests.distributed.launch import free_port, local_launcher
from tests.helpers import read_safetensors_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "launch", "pretrain.py")
TINY_YAML = os.path.join(REPO, "model_configs", "tiny.yaml")
WORDS = ("the expert router sends every token to two of eight experts while attention mixes the sequence and "
         "gradients flow back through the permutation into the weights of each small network").split()


def write_corpus(path: str, docs: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))}) + "\n")
    return path


def run(args: list[str], env_extra: dict[str, str] | None = None, launcher: list[str] | None = None,
        timeout: int = 300, config: str | None = TINY_YAML) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = (launcher or [sys.executable]) + [PRETRAIN, *(["--config", config] if config else [])] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def train_records(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(str(d / "train.jsonl"), 300, 0), write_corpus(str(d / "eval.jsonl"), 40, 1)


def test_resume_and_sigkill_mid_save(tmp_path, corpus):
    train, _ = corpus
    common = [f"data.paths=[{train}]", "train.max_steps=6", "train.save_steps=2", "train.keep_last=2",
              "export.at_end=false"]
    full = run(common + [f"train.output_dir={tmp_path / 'a'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    reference = train_records(str(tmp_path / "a"))
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "b"
    killed = run(common + [f"train.output_dir={out}"], {"FRAMEWORK_FAULT": "mid_save:4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()

    resumed = run(common + [f"train.output_dir={out}", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    again = train_records(str(out))
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the killed run were dropped from metrics.jsonl
    for step in range(1, 7):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert again[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000004", "step_00000006"]  # keep_last=2, temp removed


def test_ep2_zero3_export_matches_stock_transformers(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    from framework.data import PackedDataLoader, load_tokenizer

    train, evaluation = corpus
    out = tmp_path / "ep2"
    port = free_port()
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    proc = run([f"data.paths=[{train}]", f"data.eval_paths=[{evaluation}]", "train.max_steps=4", "train.eval_steps=4",
                "train.eval_batches=2", "train.save_steps=0", "parallel.ep_size=2", f"train.output_dir={out}"],
               launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce workspace (~69 MB per rank in the RAM-backed /dev/shm) is gone with the run
    # (framework/cluster/process_group.py); the names carry the run's master port. The op did run, so the check
    # means something:
    assert "shm_comm_op built successfully" in proc.stdout + proc.stderr
    left = glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}_*_{port}_*"))
    assert not left, left
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    eval_loss = [r for r in records if "eval_loss" in r][-1]["eval_loss"]

    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32, attn_implementation="eager")
    model.config.output_router_logits = False
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8
    tokenizer = load_tokenizer(str(out / "hf"))
    losses = []
    for rank in range(2):
        loader = PackedDataLoader([evaluation], tokenizer, seq_len=32, micro_batch_size=2, dp_rank=rank, dp_world=2,
                                  seed=0, shuffle=False)
        for _ in range(2):
            b = next(loader)
            losses.append(stock_lm_loss(model, b))
    assert sum(losses) / len(losses) == pytest.approx(eval_loss, rel=1e-5)

    # On demand, from the final checkpoint, without GPUs or processes: the same tensors as the live export.
    offline = tmp_path / "offline_hf"
    export = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ds_to_hf.py"), "--checkpoint",
                             str(out / "checkpoints"), "--output", str(offline)], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    live, again = read_safetensors_dir(out / "hf"), read_safetensors_dir(offline)
    assert set(live) == set(again) and len(live) == 80  # 3 layers, 2 with 8 per-expert triples
    assert all(torch.equal(live[k], again[k]) for k in live)


def stock_lm_loss(model, batch) -> float:
    """Stock transformers' loss on a packed batch, with the block-diagonal causal mask built here independently."""
    pos = batch["position_ids"]
    seq = pos.shape[1]
    doc = (pos == 0).cumsum(-1)
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=pos, attention_mask=mask).logits
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("name, overrides", [("zero3_ep", []), ("zero2_ep", ["parallel.zero_stage=2"]),
                                             ("zero3", [])])
def test_shipped_ds_configs_train(tmp_path, corpus, name, overrides):
    """Each shipped JSON works as it is (CPU, one process, EP=1); its resolved copy lands in the output dir."""
    train, _ = corpus
    out = tmp_path / name
    proc = run([f"data.paths=[{train}]", "train.max_steps=2", "train.save_at_end=false", "export.at_end=false",
                f"train.output_dir={out}", *overrides, "--deepspeed", os.path.join(REPO, "ds_configs", f"{name}.json")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.load(open(out / "ds_config.json"))
    assert resolved["zero_optimization"]["stage"] == (2 if name == "zero2_ep" else 3)
    assert "auto" not in json.dumps(resolved)
    assert sorted(train_records(str(out))) == [1, 2]


def test_chunked_loss_under_zero3_matches(tmp_path, corpus):
    """train.loss_chunk_tokens (0 = whole logits vs chunks of 24 tokens) under ZeRO-3: the LM head weight is gathered
    for the chunk loop and its gradient (computed in the forward pass) reaches the partitions."""
    train, _ = corpus
    losses = {}
    for chunk in (0, 24):
        out = tmp_path / f"chunk{chunk}"
        proc = run([f"data.paths=[{train}]", "train.max_steps=3", "train.save_at_end=false", "export.at_end=false",
                    f"train.loss_chunk_tokens={chunk}", f"train.output_dir={out}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[chunk] = [(r["lm_loss"], r["grad_norm"]) for _, r in sorted(train_records(str(out)).items())]
    for (a, na), (b, nb) in zip(losses[24], losses[0]):
        assert a == pytest.approx(b, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)


def test_recompute_modes_under_zero3_ep2_match(tmp_path, corpus):
    """train.activation_checkpointing true / moe / attention on 2 processes, EP=2, ZeRO-3 (each decoder layer a ZeRO-3
    leaf; whole layers, or one half recomputed inside it, the MoE half with its all-to-alls): the losses and gradient
    norms of no recomputation. Also with the all-to-alls pipelined in 2 token chunks (parallel.ep_chunks) and the MoE
    half recomputed: its start / wait exchanges run again inside the backward, with the first run's counts."""
    train, _ = corpus
    records = {}
    for mode, chunks in (("false", 1), ("true", 1), ("moe", 1), ("attention", 1), ("moe", 2)):
        out = tmp_path / f"{mode}-{chunks}"
        proc = run([f"data.paths=[{train}]", "train.max_steps=3", "train.save_at_end=false", "export.at_end=false",
                    "parallel.ep_size=2", "parallel.zero_stage=3", f"train.activation_checkpointing={mode}",
                    f"parallel.ep_chunks={chunks}", f"train.output_dir={out}"], launcher=local_launcher(2))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[mode, chunks] = [(r["lm_loss"], r["grad_norm"]) for _, r in sorted(train_records(str(out)).items())]
    assert len(records["false", 1]) == 3
    for key in records:
        for (a, na), (b, nb) in zip(records[key], records["false", 1]):
            assert a == pytest.approx(b, rel=1e-6) and na == pytest.approx(nb, rel=1e-5), key


def test_nonfinite_loss_stops_before_saving_and_resume_skips_its_batches(tmp_path, corpus):
    """A nan loss at step 3 (fault injection) stops the run at step 3 with one line and exit 1: the step-2 checkpoint
    stays the latest and no later one is written. Resuming with the train.skip_data_steps the line suggests reads and
    drops step 3's batches, so the data position at step 5 is the uninterrupted run's. With
    train.stop_on_nonfinite_loss=false the run goes on."""
    train, _ = corpus
    common = [f"data.paths=[{train}]", "train.max_steps=5", "train.save_steps=1", "train.keep_last=5",
              "train.log_steps=1", "export.at_end=false"]
    stop = tmp_path / "stop"
    proc = run(common + [f"train.output_dir={stop}"], env_extra={"FRAMEWORK_FAULT": "nan_loss:3"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 3: the training loss is nan or inf"), errors
    root = stop / "checkpoints"
    assert "the last checkpoint is " + str(root / "step_00000002") in errors[0]
    assert "train.skip_data_steps=[[3,3]]" in errors[0]
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"
    records = train_records(str(stop))
    assert sorted(records) == [1, 2, 3] and records[3]["loss"] != records[3]["loss"]  # nan, logged before stopping

    resumed = run(common + [f"train.output_dir={stop}", "train.skip_data_steps=[[3,3]]", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step 3: its batches read and dropped (train.skip_data_steps), no update" in resumed.stdout
    assert sorted(train_records(str(stop))) == [1, 2, 4, 5]
    whole = tmp_path / "whole"
    assert run(common + [f"train.output_dir={whole}"]).returncode == 0

    def data_position(out, step):
        with open(out / "checkpoints" / f"step_{step:08d}" / "data_state.json") as f:
            return json.load(f)

    for step in (3, 5):
        assert data_position(stop, step) == data_position(whole, step), step

    proc = run(common + [f"train.output_dir={tmp_path / 'go_on'}", "train.stop_on_nonfinite_loss=false"],
               env_extra={"FRAMEWORK_FAULT": "nan_loss:3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(train_records(str(tmp_path / "go_on"))) == [1, 2, 3, 4, 5]
