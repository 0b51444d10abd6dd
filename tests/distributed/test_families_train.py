"""launch/pretrain.py with a Mixtral, Qwen2-MoE or OLMoE model.hf_config on CPU: the exported directory is the
family's stock transformers model (strict load) with the logits of framework.load_model, EP=2 over two processes
trains the same losses as one process, and a run saved by one process resumes with EP=2.

Runtime (~40 s a run) keeps the matrix small: export and EP=2 for every family (Qwen2-MoE's EP=2 under ZeRO-2,
where MoE blocks are re-classed as DeepSpeed MoE layers and its shared expert must survive that), resume for Mixtral
and Qwen2-MoE (whose shared expert adds dense parameters inside the MoE block to the resharding load)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.distributed.launch import free_port
from tests.distributed.test_pretrain import corpus, run, train_records  # noqa: F401 (corpus is a fixture)
from tests.helpers import write_family_run_yaml

pytestmark = pytest.mark.slow
STEPS = 3
STOCK_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def _train(tmp_path, train: str, name: str, family: str = "mixtral", ep_size: int = 1, steps: int = STEPS,
           extra: tuple = ()) -> str:
    config = write_family_run_yaml(str(tmp_path / f"{family}.yaml"), family)
    out = str(tmp_path / name)
    launcher = None
    if ep_size > 1:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ep_size), "--master_port",
                    str(free_port())]
    proc = run([f"data.paths=[{train}]", f"train.max_steps={steps}", "train.save_steps=0", "export.at_end=true",
                f"parallel.ep_size={ep_size}", f"train.output_dir={out}", *extra], launcher=launcher, config=config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("family", list(STOCK_CLASSES))
def test_family_trains_and_exports_a_stock_model(tmp_path, corpus, family):  # noqa: F811
    import transformers
    from transformers import AutoModelForCausalLM

    import framework

    out = _train(tmp_path, corpus[0], "one", family)
    assert sorted(train_records(out)) == list(range(1, STEPS + 1))
    hf = os.path.join(out, "hf")
    stock, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert isinstance(stock, getattr(transformers, STOCK_CLASSES[family]))
    assert not any(info.values()), info  # strict: no missing, unexpected or mismatched tensors
    ours = framework.load_model(hf, backend="eager", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, stock.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = stock(ids).logits, ours(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("family,zero_stage", [("mixtral", 3), ("qwen2_moe", 2), ("olmoe", 3)])
def test_family_ep2_matches_one_process(tmp_path, corpus, family, zero_stage):  # noqa: F811
    extra = (f"parallel.zero_stage={zero_stage}",)
    one = train_records(_train(tmp_path, corpus[0], "one", family, extra=extra))
    two = train_records(_train(tmp_path, corpus[0], "ep2", family, ep_size=2, extra=extra))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_family_resumes_at_another_ep_size(tmp_path, corpus, family):  # noqa: F811
    """Saved by one process, resumed by two with EP=2 (the resharding load with the family's parameter names): steps
    3-4 equal the uninterrupted run's."""
    full = _train(tmp_path, corpus[0], "full", family, steps=4, extra=("train.save_steps=2",))
    step2 = os.path.join(full, "checkpoints", "step_00000002")
    resumed = _train(tmp_path, corpus[0], "resumed", family, ep_size=2, steps=4, extra=("--resume", step2))
    want, got = train_records(full), train_records(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
