"""launch/pretrain.py with a Mixtral model.hf_config (model_type mixtral) on CPU: the exported directory is a stock
MixtralForCausalLM (strict load) with the logits of framework.load_model, and EP=2 over two processes trains the same
losses as one process."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.distributed.launch import free_port
from tests.distributed.test_pretrain import corpus, run, train_records  # noqa: F401 (corpus is a fixture)
from tests.helpers import write_mixtral_run_yaml

pytestmark = pytest.mark.slow
STEPS = 3


def _train(tmp_path, train: str, name: str, ep_size: int = 1) -> str:
    config = write_mixtral_run_yaml(str(tmp_path / "mixtral.yaml"))
    out = str(tmp_path / name)
    launcher = None
    if ep_size > 1:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ep_size), "--master_port",
                    str(free_port())]
    proc = run([f"data.paths=[{train}]", f"train.max_steps={STEPS}", "train.save_steps=0", "export.at_end=true",
                f"parallel.ep_size={ep_size}", f"train.output_dir={out}"], launcher=launcher, config=config)
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
