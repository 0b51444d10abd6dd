"""Packed documents attend only to themselves; activation checkpointing changes no number."""

from __future__ import annotations

import pytest
import torch

import framework
from tests.helpers import TINY, rel_err


def _model(attn: str, **options):
    torch.manual_seed(0)
    return framework.load_model(dict(TINY), backend="grouped_mm", attn_implementation=attn, seed=3, **options)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_match_separate_runs(attn):
    model = _model(attn).eval()
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in (5, 7, 4)]
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits[0]
        start = 0
        for d in docs:
            alone = model(d.unsqueeze(0)).logits[0]
            assert rel_err(packed[start:start + len(d)], alone) < 1e-5
            start += len(d)
        # Without the position ids the same row is one sequence: later documents see earlier ones.
        unpacked = model(ids).logits[0]
    assert rel_err(unpacked[5:], packed[5:]) > 1e-3


@pytest.mark.parametrize("mode", [True, "moe", "attention"])
def test_activation_checkpointing_same_loss_and_gradients(mode):
    """Whole layers or one half of each recomputed: loss and every gradient as without recomputation."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    results = []
    for recompute in (False, mode):
        model = _model("eager", activation_checkpointing=recompute)
        out = model(ids, labels=ids, position_ids=pos)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert rel_err(grads_b[name], grad) < 1e-6, name


def test_chunked_loss_same_loss_and_gradients():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    results = []
    for chunk in (0, 5):  # 5 does not divide the 24 tokens: a short last chunk
        model = _model("eager", loss_chunk_tokens=chunk)
        out = model(ids, labels=labels, position_ids=pos)
        out.loss.backward()
        assert (out.logits is None) == (chunk > 0)
        results.append((out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert rel_err(loss_b, loss_a) < 1e-6
    for name, grad in grads_a.items():
        assert rel_err(grads_b[name], grad) < 1e-6, name


def test_recompute_modes_keep_less():
    """Bytes autograd keeps outside checkpointed regions in one forward: whole layers < one half < nothing."""
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))
    kept = {}
    for mode in (False, "moe", "attention", True):
        model = _model("eager", activation_checkpointing=mode)
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept[mode] = sum(n for ptr, n in storages.items() if ptr not in weights)
    assert kept[True] < kept["moe"] < kept[False] and kept[True] < kept["attention"] < kept[False], kept
