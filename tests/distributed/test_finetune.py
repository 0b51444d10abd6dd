"""launch/finetune.py end to end on CPU: the embedded demo trains (loss falls) and exports a directory that stock
transformers loads and chats with; bad chat data stops before training with one line and exit 2; and one step's
gradient is that of the mean token loss over the whole global batch (per-token normalisation across micro batches
and ranks), checked against a single-process computation."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from tests.distributed.launch import free_port, local_launcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINETUNE = os.path.join(REPO, "launch", "finetune.py")
TINY_YAML = os.path.join(REPO, "model_configs", "tiny.yaml")


def run(args: list[str], launcher: list[str] | None = None, timeout: int = 300,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run((launcher or [sys.executable]) + [FINETUNE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def deepspeed(processes: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
            str(free_port())]


def train_records(out) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_demo_trains_and_its_export_chats_in_stock_transformers(tmp_path):
    """The embedded default (shortened to 30 steps for CI): loss falls; OUT/hf holds the tokenizer with its chat
    template and generates an answer to a chat prompt with greedy decoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    proc = run([f"train.output_dir={out}", "train.max_steps=30", "train.save_steps=0", "train.progress_bar=false"],
               launcher=deepspeed(1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running the demo (model_configs/finetune_demo.yaml)" in proc.stdout
    assert "assistant tokens (the loss is on those)" in proc.stdout
    records = train_records(out)
    assert records[30]["lm_loss"] < records[10]["lm_loss"] - 0.5, records

    tokenizer = AutoTokenizer.from_pretrained(str(out / "hf"))
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|assistant|>\n")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = generated[0, prompt["input_ids"].shape[1]:]
    assert len(answer) > 0 and tokenizer.decode(answer, skip_special_tokens=True).strip()


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "Is anyone there?"}]}, ":1: no conversation has an assistant message"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "wizard", "value": "x"}]},
     ":1: turn 1: unknown role 'wizard'"),
])
def test_bad_chat_data_is_one_line_before_training(tmp_path, record, message):
    data = write_jsonl(tmp_path / "chat.jsonl", [record])
    proc = run(["--config", TINY_YAML, f"data.paths=[{data}]", f"train.output_dir={tmp_path / 'out'}"],
               launcher=deepspeed(1) if "assistant" in message else None)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: data.paths: {data}{message}" + errors[0].split(message, 1)[1]], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_loss_is_normalised_per_token_over_the_global_batch(tmp_path):
    """2 processes (EP=2, ZeRO-3) x 2 accumulation steps, one row per micro batch, rows with different numbers of
    assistant tokens: step 1's gradient norm and loss are those of the mean token loss over all 4 rows computed here
    in one process, and not those of the mean of the 4 micro batches' means."""
    import framework
    from framework.data import load_tokenizer
    from framework.data.chat_dataset import ChatData
    from framework.data.chat_rows import ChatRows
    from framework.data.samples import StepBatchLoader, default_num_streams

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    def say(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    conversations = [{"messages": [{"role": "user", "content": say(2, 30)}, {"role": "assistant", "content": say(1, 40)}]}
                     for _ in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    out = tmp_path / "run"
    proc = run(["--config", TINY_YAML, f"data.paths=[{data}]", "data.seq_len=96", "train.max_steps=1",
                "train.micro_batch_size=1", "train.global_batch_size=4", "train.save_at_end=false",
                "export.at_end=false", "moe.aux_loss_coef=0", "parallel.ep_size=2", f"train.output_dir={out}"],
               launcher=local_launcher(2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = train_records(out)[1]

    cfg = yaml.safe_load(open(TINY_YAML))
    tokenizer = load_tokenizer(os.path.join(REPO, "framework", "assets", "tokenizer"))
    (cache,) = glob.glob(str(out / "data_cache" / "chat" / "*"))
    chat = ChatData(cache)
    rows = ChatRows(chat, 96, default_num_streams(4, chat.num_conversations), seed=0, shuffle=True,
                    pad_id=tokenizer.pad_token_id)
    batch = next(StepBatchLoader(rows, 4, 4, 0, 1))  # the global batch of step 1, samples 0..3
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert len(set(counts.tolist())) > 1, counts  # the micro batches differ in labelled tokens

    model = framework.load_model(cfg["model"]["hf_config"], backend=cfg["moe"]["backend"], dtype=torch.float32,
                                 attn_implementation="eager", aux_loss_coef=0.0, seed=0, loss_chunk_tokens=4096)
    out_all = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    out_all.lm_loss.backward()  # the mean over every labelled token of the global batch
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    assert logged["lm_loss"] == pytest.approx(out_all.lm_loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)

    with torch.no_grad():  # what a mean of per-micro-batch means would have logged: measurably different
        means = [model(batch["input_ids"][i:i + 1], labels=batch["labels"][i:i + 1],
                       position_ids=batch["position_ids"][i:i + 1]).lm_loss.item() for i in range(4)]
    assert abs(sum(means) / 4 - out_all.lm_loss.item()) > 1e-3


def test_from_hf_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Initialised from an HF checkpoint directory holding its tokenizer and chat template (as a released one does):
    a run killed right after its step-2 save and resumed with --resume auto logs the uninterrupted run's steps 3-4,
    and its evaluation on chat data (data.eval_paths) too."""
    import shutil

    from tests.helpers import stock_model

    ckpt = tmp_path / "released"
    stock_model(seed=1, vocab_size=4096, max_position_embeddings=256).save_pretrained(str(ckpt))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(REPO, "framework", "assets", "tokenizer", name), ckpt / name)
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"from": "human", "value": f"Spell {w}."}, {"from": "gpt", "value": " ".join(w)}]}
        for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda")])
    common = ["--config", TINY_YAML, "model.hf_config=", f"model.path={ckpt}", f"data.paths=[{data}]",
              f"data.eval_paths=[{data}]", "train.eval_steps=2", "train.eval_batches=2", "data.seq_len=48",
              "train.max_steps=4", "train.save_steps=2", "export.at_end=false"]
    full = run([*common, f"train.output_dir={tmp_path / 'a'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run([*common, f"train.output_dir={tmp_path / 'b'}"], env_extra={"FRAMEWORK_FAULT": "after_save:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run([*common, f"train.output_dir={tmp_path / 'b'}", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    want, got = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in (3, 4):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6), (step, key)
    evals = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl") if "eval_loss" in line]
    want_evals = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl") if "eval_loss" in line]
    assert [e["step"] for e in want_evals] == [2, 4] and evals[-1]["step"] == 4
    assert evals[-1]["eval_loss"] == pytest.approx(want_evals[-1]["eval_loss"], rel=1e-6)
    assert want_evals[-1]["eval_loss"] < want_evals[0]["eval_loss"]


def test_fine_tunes_another_family_from_its_hub_checkpoint(tmp_path):
    """A released DeepSeek-V3-architecture checkpoint (stock transformers' save_pretrained: MLA, a dense first layer,
    shared experts, grouped sigmoid routing) fine-tuned with EP=2 on 2 processes: trains, and the export loads
    strictly in stock transformers with its chat template and our logits."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import framework
    from tests.family_cases import TINY_STOCK_CONFIGS

    config = AutoConfig.for_model("deepseek_v3", **dict(TINY_STOCK_CONFIGS["deepseek_v3"], vocab_size=4096,
                                                        max_position_embeddings=256))
    torch.manual_seed(0)
    ckpt = tmp_path / "released"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(ckpt))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(REPO, "framework", "assets", "tokenizer", name), ckpt / name)
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": f"Spell {w}."}, {"role": "assistant", "content": " ".join(w)}]}
        for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")])
    out = tmp_path / "out"
    proc = run(["--config", TINY_YAML, "model.hf_config=", f"model.path={ckpt}", f"data.paths=[{data}]",
                "data.seq_len=48", "train.max_steps=3", "train.save_steps=0", "parallel.ep_size=2",
                f"train.output_dir={out}"], launcher=local_launcher(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(train_records(out)) == [1, 2, 3]
    stock, info = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32,
                                                       attn_implementation="eager", output_loading_info=True)
    assert type(stock).__name__ == "DeepseekV3ForCausalLM" and not any(info.values()), info
    assert AutoTokenizer.from_pretrained(str(out / "hf")).chat_template
    ours = framework.load_model(str(out / "hf"), backend="eager", attn_implementation="eager").eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = stock.eval()(ids).logits, ours(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
