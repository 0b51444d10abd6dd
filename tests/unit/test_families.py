"""The family registry and Mixtral on our MoE layer against stock transformers 5 (eager experts), fp32 on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import framework
from framework.models.registry import FAMILIES, family_for
from tests.helpers import assert_state_dicts_interchange, batch, rel_err, spread_weights, write_hub_per_expert

TOL = 1e-5
# H != I and H != 2I so a gate/up or transpose mix-up cannot pass by shape; multiples of 8 for _grouped_mm strides.
TINY_MIXTRAL = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.02, output_router_logits=True, max_position_embeddings=64,
                    tie_word_embeddings=False)


def stock_mixtral(attn: str = "eager") -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(**TINY_MIXTRAL)
    config._attn_implementation = attn
    config._experts_implementation = "eager"
    return spread_weights(MixtralForCausalLM(config).float())



def write_mixtral_hub(stock: MixtralForCausalLM, path: str) -> None:
    """The Mixtral hub's `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (transformers' conversion_mapping.py)."""
    write_hub_per_expert(stock, path, ("w1", "w3", "w2"), "block_sparse_moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    stock = stock_mixtral()
    root = tmp_path_factory.mktemp("mixtral")
    hub, native = str(root / "hub"), str(root / "native")
    write_mixtral_hub(stock, hub)
    stock.save_pretrained(native)
    return stock, hub, native


def test_hub_layout_is_what_transformers_reads(checkpoints):
    stock, hub, _ = checkpoints
    reloaded = MixtralForCausalLM.from_pretrained(hub, dtype=torch.float32)
    for k, v in stock.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_state_dicts_interchange():
    stock = stock_mixtral()
    ours = framework.load_model(stock.config, backend="eager", seed=3)
    assert type(ours).__name__ == "MixtralCausalLM"
    ours_sd, stock_sd = ours.state_dict(), stock.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in stock_sd.items()}
    assert {k: tuple(v.shape) for k, v in ours.named_buffers()} == {k: tuple(v.shape)
                                                                     for k, v in stock.named_buffers()}
    assert_state_dicts_interchange(ours, MixtralForCausalLM, stock.config, stock_sd)


@pytest.mark.parametrize("layout", ["hub", "native"])
@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loaded_mixtral_matches_transformers_padded(checkpoints, layout, backend, attn):
    stock, hub, native = checkpoints
    stock.config._attn_implementation = attn
    ours = framework.load_model(hub if layout == "hub" else native, backend=backend, attn_implementation=attn).eval()
    for k, v in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ids, mask, labels = batch(pad_right=True)
    with torch.no_grad():
        ref = stock(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert rel_err(out.logits[real], ref.logits[real]) <= TOL
    assert rel_err(out.aux_loss, ref.aux_loss) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    assert out.aux_loss.item() > 1.0  # balanced routing gives top_k = 2; a zero aux loss would pass trivially


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_loaded_mixtral_matches_transformers_packed(checkpoints, backend):
    """Packed documents (position ids restarting at 0) against stock transformers run on each document alone: stock
    does not separate packed documents itself."""
    stock, hub, _ = checkpoints
    stock.config._attn_implementation = "sdpa"
    ours = framework.load_model(hub, backend=backend, attn_implementation="sdpa").eval()
    ids = batch(bsz=1, seq=12, pad_right=False)[0]
    lengths = [5, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        out = ours(ids, position_ids=pos, labels=ids)
        docs = [stock(input_ids=d, output_router_logits=True) for d in ids.split(lengths, dim=1)]
    ref_logits = torch.cat([d.logits for d in docs], dim=1)
    ref_loss = F.cross_entropy(ref_logits[0, :-1], ids[0, 1:])  # our labels shift across documents too
    per_layer = [torch.cat(layer) for layer in zip(*(d.router_logits for d in docs))]
    ref_aux = load_balancing_loss_func(tuple(per_layer), stock.config.num_local_experts,
                                       stock.config.num_experts_per_tok)
    assert rel_err(out.logits, ref_logits) <= TOL
    assert rel_err(out.lm_loss, ref_loss) <= TOL
    assert rel_err(out.aux_loss, ref_aux) <= TOL
    assert rel_err(out.loss, ref_loss + stock.config.router_aux_loss_coef * ref_aux) <= TOL


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError) as err:
        framework.load_model({"model_type": "llama", "hidden_size": 32})
    assert str(err.value) == ("config dict: model_type is 'llama', which is not supported; supported: "
                              "qwen3_moe, mixtral, qwen2_moe, olmoe, deepseek_v3")
    assert "\n" not in str(err.value)


def test_family_for_reads_paths_dicts_and_configs(checkpoints, tmp_path):
    _, hub, _ = checkpoints
    assert family_for(hub) is FAMILIES["mixtral"]
    assert family_for(os.path.join(hub, "config.json")) is FAMILIES["mixtral"]
    assert family_for(MixtralConfig(**TINY_MIXTRAL)) is FAMILIES["mixtral"]
    assert family_for({"model_type": "qwen3_moe"}) is FAMILIES["qwen3_moe"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_MIXTRAL, "model_type": "mixtral", "router_jitter_noise": 0.1}))
    with pytest.raises(ValueError, match="router_jitter_noise 0.1 is not implemented"):
        framework.load_model(str(path))


def test_each_family_layout_is_its_architectures():
    """The run plan reads a family's MoE layout without its model code (Family.layout); its model is built with the
    same object (Architecture.layout)."""
    for name, family in FAMILIES.items():
        assert family.causal_lm.architecture.layout is family.layout, name


def test_a_run_plan_imports_no_model_code(tmp_path):
    """Resolving the tiny run's plan (what launch/pretrain.py does before any process group, and all a configuration
    error or the validated multi-node launch needs) imports no family's model code, ours (framework.models.F.model)
    or transformers' (transformers.models.F.modeling_F): they cost ~2 s of each such process's start."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    model_code = r"framework\.models\.\w+\.model|transformers\.models\.(?!auto\.)(\w+)\.modeling_\1"
    code = ("import re, sys\n"
            "from framework.config import load_run_config\n"
            "from framework.config.plan import resolve_plan\n"
            "run = load_run_config(sys.argv[1], ['train.output_dir=' + sys.argv[2], 'data.synthetic=true'])\n"
            "plan = resolve_plan(run, 2)\n"
            "print(plan.gas, sorted(m for m in sys.modules if re.fullmatch(sys.argv[3], m)))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(repo, "model_configs", "tiny.yaml"),
                           str(tmp_path / "out"), model_code], capture_output=True, text=True, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "1 []", proc.stdout[-2000:]


@pytest.mark.parametrize("head_dim", [8, None])  # None: transformers' hidden / heads
def test_flops_per_token_mixtral_by_hand(head_dim):
    from framework.models.mixtral.config import load_mixtral_config
    from framework.train.flops import flops_per_token

    config = load_mixtral_config({**TINY_MIXTRAL, "head_dim": head_dim})
    h, qd, kvd, inter, k, e, vocab, layers, seq = 32, 32, 16, 24, 2, 8, 96, 2, 16
    per_layer = h * qd + 2 * h * kvd + qd * h + k * 3 * h * inter + h * e  # every Mixtral layer is MoE
    expected = 6 * (layers * per_layer + h * vocab) + 6 * layers * seq * qd
    assert expected == 119808
    assert flops_per_token(config, seq) == expected
    tied = load_mixtral_config({**TINY_MIXTRAL, "head_dim": head_dim, "tie_word_embeddings": True})
    assert flops_per_token(tied, seq) == expected  # a tied LM head is still a matmul per token
