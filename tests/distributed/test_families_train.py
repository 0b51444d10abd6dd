"""launch/pretrain.py with a Mixtral model.hf_config (model_type mixtral) on CPU: the exported directory is a stock
MixtralForCausalLM (strict load) with the logits of framework.load_model, EP=2 over two processes trains the same
losses as one process, and tools/ds_to_hf.py turns a (tied-embedding) Mixtral training checkpoint into directories
stock transformers loads strictly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.launch import free_port
from tests.distributed.test_pretrain import REPO, corpus, run, train_records  # noqa: F401 (corpus is a fixture)
from tests.helpers import read_safetensors_dir, write_mixtral_run_yaml

pytestmark = pytest.mark.slow
STEPS = 3


def _train(tmp_path, train: str, name: str, ep_size: int = 1, steps: int = STEPS, extra: tuple = (),
           **hf_overrides) -> str:
    config = write_mixtral_run_yaml(str(tmp_path / f"{name}.yaml"), **hf_overrides)
    out = str(tmp_path / name)
    launcher = None
    if ep_size > 1:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ep_size), "--master_port",
                    str(free_port())]
    proc = run([f"data.paths=[{train}]", f"train.max_steps={steps}", "train.save_steps=0", "export.at_end=true",
                f"parallel.ep_size={ep_size}", f"train.output_dir={out}", *extra], launcher=launcher, config=config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_mixtral_trains_and_exports_a_stock_model(tmp_path, corpus):  # noqa: F811
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    import framework

    out = _train(tmp_path, corpus[0], "one")
    assert sorted(train_records(out)) == list(range(1, STEPS + 1))
    hf = os.path.join(out, "hf")
    stock, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert isinstance(stock, MixtralForCausalLM)
    assert not any(info.values()), info  # strict: no missing, unexpected or mismatched tensors
    ours = framework.load_model(hf, backend="eager", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, stock.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = stock(ids).logits, ours(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_mixtral_ep2_matches_one_process(tmp_path, corpus):  # noqa: F811
    one = train_records(_train(tmp_path, corpus[0], "one"))
    two = train_records(_train(tmp_path, corpus[0], "ep2", ep_size=2))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step


def test_mixtral_resumes_at_another_ep_size(tmp_path, corpus):  # noqa: F811
    """Saved by one process, resumed by two with EP=2 (the resharding load with Mixtral's parameter names): steps
    3-4 equal the uninterrupted run's."""
    full = _train(tmp_path, corpus[0], "full", steps=4, extra=("train.save_steps=2",))
    step2 = os.path.join(full, "checkpoints", "step_00000002")
    resumed = _train(tmp_path, corpus[0], "resumed", ep_size=2, steps=4, extra=("--resume", step2))
    want, got = train_records(full), train_records(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)


def test_mixtral_checkpoint_exports_offline_tied(tmp_path, corpus):  # noqa: F811
    """ds_to_hf on a tied Mixtral training checkpoint: --format hf writes the hub's block_sparse_moe.experts.{e}.w1 /
    w3 / w2 names (the same tensors as the trainer's live export), --format merged the fused ones; both load strictly
    in stock transformers, tied, with the same logits."""
    from transformers import AutoModelForCausalLM

    out = _train(tmp_path, corpus[0], "tied", steps=1, tie_word_embeddings=True)
    exported = {}
    for fmt in ("hf", "merged"):
        exported[fmt] = str(tmp_path / f"offline_{fmt}")
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ds_to_hf.py"), "--checkpoint",
                               os.path.join(out, "checkpoints"), "--output", exported[fmt], "--format", fmt,
                               "--quiet"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    hub, live = read_safetensors_dir(exported["hf"]), read_safetensors_dir(os.path.join(out, "hf"))
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in hub and "lm_head.weight" not in hub
    assert set(hub) == set(live) and all(torch.equal(hub[k], live[k]) for k in live)
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_safetensors_dir(exported["merged"])
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for path in exported.values():
        stock, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                           output_loading_info=True)
        assert not any(info.values()), info  # strict: no missing, unexpected or mismatched tensors
        assert stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            results.append(stock.eval()(ids).logits)
    assert torch.equal(results[0], results[1])
