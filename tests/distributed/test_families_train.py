"""launch/pretrain.py with a Mixtral, Qwen2-MoE, OLMoE or DeepSeek-V3 model.hf_config on CPU: the exported directory
is the family's stock transformers model (strict load) with the logits of framework.load_model, EP=2 over two
processes trains the same losses as one process, a run saved by one process resumes with EP=2, and tools/ds_to_hf.py
turns a (tied-embedding) Mixtral training checkpoint into directories stock transformers loads strictly.

Runtime (~40 s a run) keeps the matrix small: export and EP=2 for every family (Qwen2-MoE's EP=2 under ZeRO-2,
where MoE blocks are built as DeepSpeed MoE layers and its shared expert must survive that), resume for Mixtral
and Qwen2-MoE (whose shared expert adds dense parameters inside the MoE block to the resharding load). DeepSeek-V3
runs with auxiliary-loss-free balancing on, so its routers' selection biases move every step and must be the same on
every rank, saved, restored and exported; one 4-step run serves its checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.launch import local_launcher, run_workers
from tests.distributed.test_pretrain import REPO, corpus, run, train_records  # noqa: F401 (corpus is a fixture)
from tests.helpers import TINY_DEEPSEEK_RUN, read_safetensors_dir, write_family_run_yaml, write_run_yaml

pytestmark = pytest.mark.slow
STEPS = 4  # the resume tests continue the one-process run from its step-2 checkpoint through steps 3-4
SAVE_AT = 2
STOCK_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def _train(tmp_path, train: str, name: str, family: str = "mixtral", ep_size: int = 1, steps: int = STEPS,
           extra: tuple = (), config: str | None = None, **hf_overrides) -> str:
    """`config`: a run YAML of its own (default: model_configs/tiny.yaml with the family's tiny model)."""
    config = config or write_family_run_yaml(str(tmp_path / f"{name}.yaml"), family, **hf_overrides)
    out = str(tmp_path / name)
    launcher = local_launcher(ep_size) if ep_size > 1 else None
    proc = run([f"data.paths=[{train}]", f"train.max_steps={steps}", "train.save_steps=0", "export.at_end=true",
                f"parallel.ep_size={ep_size}", f"train.output_dir={out}", *extra], launcher=launcher, config=config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus):  # noqa: F811
    """(family, ZeRO stage) -> the output directory of its 1-process run (STEPS steps, saved at step SAVE_AT,
    exported at the end), made once for the module: the export test, the EP=2 test and the resume test of a family at
    the same stage read the same run (none writes to it), one launch instead of two."""
    runs: dict[tuple[str, int], str] = {}

    def out(family: str, zero_stage: int) -> str:
        if (family, zero_stage) not in runs:
            tmp = tmp_path_factory.mktemp(f"one-{family}-z{zero_stage}")
            extra = (f"parallel.zero_stage={zero_stage}", f"train.save_steps={SAVE_AT}")
            runs[family, zero_stage] = _train(tmp, corpus[0], "one", family, extra=extra)
        return runs[family, zero_stage]

    return out


@pytest.mark.parametrize("family", list(STOCK_CLASSES))
def test_family_trains_and_exports_a_stock_model(one_process, family):
    import transformers
    from transformers import AutoModelForCausalLM

    import framework

    out = one_process(family, 3)  # model_configs/tiny.yaml's ZeRO stage, named so that the EP=2 test can share it
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
def test_family_ep2_matches_one_process(tmp_path, corpus, one_process, family, zero_stage):  # noqa: F811
    extra = (f"parallel.zero_stage={zero_stage}",)
    one = train_records(one_process(family, zero_stage))
    two = train_records(_train(tmp_path, corpus[0], "ep2", family, ep_size=2, extra=extra))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_family_resumes_at_another_ep_size(tmp_path, corpus, one_process, family):  # noqa: F811
    """Saved by one process, resumed by two with EP=2 (the resharding load with the family's parameter names): steps
    3-4 equal the uninterrupted run's."""
    full = one_process(family, 3)  # model_configs/tiny.yaml's ZeRO stage, as the resumed run's
    step2 = os.path.join(full, "checkpoints", f"step_{SAVE_AT:08d}")
    resumed = _train(tmp_path, corpus[0], "resumed", family, ep_size=2, steps=4, extra=("--resume", step2))
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


# ----------------------------------------------------------------------------------------------------------------------
# DeepSeek-V3: one 4-step run (saved at step 2) serves all three checks

BIAS_RATE = 0.01  # large next to the spread of sigmoid scores at init: the biases change the routing within steps
BIAS_KEY = "e_score_correction_bias"


def _deepseek_config(tmp_path) -> str:
    return write_run_yaml(str(tmp_path / "deepseek.yaml"), TINY_DEEPSEEK_RUN, router_bias_update_rate=BIAS_RATE)


def _biases(hf_dir: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_safetensors_dir(hf_dir).items() if k.endswith(BIAS_KEY)}


@pytest.fixture(scope="module")
def deepseek_run(tmp_path_factory, corpus):  # noqa: F811
    tmp = tmp_path_factory.mktemp("deepseek")
    out = _train(tmp, corpus[0], "full", steps=4, extra=("train.save_steps=2",), config=_deepseek_config(tmp))
    return tmp, out


def test_deepseek_v3_trains_and_exports_a_stock_model(deepseek_run):
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    import framework

    _, out = deepseek_run
    assert sorted(train_records(out)) == [1, 2, 3, 4]
    hf = os.path.join(out, "hf")
    biases = _biases(hf)
    assert sorted(biases) == [f"model.layers.{i}.mlp.gate.{BIAS_KEY}" for i in (1, 2)]
    assert any(bias.abs().max() > 0 for bias in biases.values())  # moved by steps of +-rate
    for bias in biases.values():  # exported fp32, as transformers keeps it
        assert bias.dtype == torch.float32
        assert torch.allclose(bias / BIAS_RATE, (bias / BIAS_RATE).round(), atol=1e-4)
    stock, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert isinstance(stock, DeepseekV3ForCausalLM)
    assert not any(info.values()), info  # strict: no missing, unexpected or mismatched tensors
    for name, bias in biases.items():
        assert torch.equal(stock.state_dict()[name], bias), name
    ours = framework.load_model(hf, backend="eager", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, stock.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = stock(ids).logits, ours(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5

    # offline, from the final checkpoint (tools/ds_to_hf.py): the same tensors as the live export, biases included
    offline = os.path.join(out, "offline_hf")
    export = subprocess.run([sys.executable, os.path.join(REPO, "tools", "ds_to_hf.py"), "--checkpoint",
                             os.path.join(out, "checkpoints"), "--output", offline], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    live, again = read_safetensors_dir(hf), read_safetensors_dir(offline)
    assert set(live) == set(again)
    assert all(torch.equal(live[k], again[k]) for k in live)


def test_deepseek_v3_ep2_matches_one_process_and_resumes_in_place(deepseek_run, corpus):  # noqa: F811
    """EP=2 under ZeRO-2 (MoE blocks built as DeepSpeed MoE layers, whose save and load DeepSpeed does itself at
    the same topology) trains the losses and biases of the one-process ZeRO-3 run: the load is counted over the
    global batch, not per rank (its saves also check that both ranks hold the same biases). Resumed from its own
    step-2 checkpoint at the same topology, steps 3-4 and the biases come back the same."""
    tmp, one = deepseek_run
    config = _deepseek_config(tmp)
    stage = "parallel.zero_stage=2"
    two = _train(tmp, corpus[0], "ep2", ep_size=2, steps=4, extra=("train.save_steps=2", stage), config=config)
    want, got = train_records(one), train_records(two)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), step
    for name, bias in _biases(os.path.join(one, "hf")).items():
        assert torch.equal(_biases(os.path.join(two, "hf"))[name], bias), name
    step2 = os.path.join(two, "checkpoints", "step_00000002")
    again = _train(tmp, corpus[0], "ep2-resumed", ep_size=2, steps=4, extra=(stage, "--resume", step2),
                   config=config)
    resumed = train_records(again)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(got[step]["loss"], rel=1e-4), step
    for name, bias in _biases(os.path.join(two, "hf")).items():
        assert torch.equal(_biases(os.path.join(again, "hf"))[name], bias), name


def test_deepseek_v3_resumes_at_another_ep_size(deepseek_run, corpus):  # noqa: F811
    """Saved by one process at step 2, resumed by two with EP=2 (the resharding load, which restores the biases from
    buffers.pt): steps 3-4 and the final biases equal the uninterrupted run's."""
    tmp, full = deepseek_run
    step2 = os.path.join(full, "checkpoints", "step_00000002")
    assert _saved_biases_moved(step2)
    resumed = _train(tmp, corpus[0], "resumed", ep_size=2, steps=4, extra=("--resume", step2),
                     config=_deepseek_config(tmp))
    want, got = train_records(full), train_records(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
    for name, bias in _biases(os.path.join(full, "hf")).items():
        assert torch.equal(_biases(os.path.join(resumed, "hf"))[name], bias), name


def _saved_biases_moved(tag_dir: str) -> bool:
    saved = torch.load(os.path.join(tag_dir, "buffers.pt"), weights_only=True)
    return len(saved) == 2 and any(b.abs().max() > 0 for b in saved.values())


def test_router_biases_identical_on_every_rank(tmp_path):
    """Two gloo ranks route different tokens; after 3 steps both hold the same biases, equal to the rule applied by
    hand to the sum of both ranks' counts (tests/distributed/bias_worker.py)."""
    run_workers(os.path.join(os.path.dirname(__file__), "bias_worker.py"), [str(tmp_path)], world=2, timeout=300)
    gathered = torch.load(os.path.join(tmp_path, "bias.pt"), weights_only=True)
    assert len(gathered) == 2 and torch.equal(gathered[0], gathered[1])
