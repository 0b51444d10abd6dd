"""framework/zero/optimizer_step.py: the clipping factor handed to torch's fused AdamW equals DeepSpeed's separate
pass. The fp32 norm on CUDA against fp64: tests/gpu/test_optimizer_step_gpu.py.

End to end (EP and ZeRO-3/2 engines with the changes installed against plain torch clipping + AdamW):
tests/distributed/test_ep_zero.py.
"""

from __future__ import annotations

import pytest
import torch

from framework.zero.optimizer_step import combined_scale


def deepspeed_factor(norm: float, loss_scale: float, clip: float) -> float:
    """stage3.unscale_and_clip_grads' combined scale, written out from DeepSpeed 0.19.8."""
    if clip <= 0:
        return loss_scale
    return max(((norm / loss_scale) + 1e-6) / clip, 1.0) * loss_scale


@pytest.mark.parametrize("norm,loss_scale,clip", [(3.0, 1.0, 1.0), (0.2, 1.0, 1.0), (3.0, 1024.0, 0.5),
                                                  (3.0, 1.0, 0.0), (3.0, 8.0, 0.0)])
def test_combined_scale_is_deepspeeds(norm, loss_scale, clip):
    got = combined_scale(torch.tensor(norm, dtype=torch.float64), loss_scale, clip, torch.device("cpu"))
    expected = deepspeed_factor(norm, loss_scale, clip)
    if clip <= 0 and loss_scale == 1.0:
        assert got is None
    else:
        assert got.dtype == torch.float32 and got.shape == ()
        assert abs(got.item() - expected) <= 1e-6 * expected


def test_invalid_norm_clips_to_nothing():
    # DeepSpeed's sentinel for a non-finite norm is -1: the factor must not read it as a small norm
    assert torch.isinf(combined_scale(torch.tensor(-1.0), 1.0, 1.0, torch.device("cpu")))


def test_fused_adamw_with_grad_scale_equals_a_scaled_gradient():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4096))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = torch.optim.AdamW([a], lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW([b], lr=1e-2, fused=True)
    for step in range(3):
        g = torch.randn(4096) * (step + 2)
        scale = combined_scale(g.norm(), 1.0, 1.0, torch.device("cpu"))
        a.grad, b.grad = g.clone(), g / scale
        opt_a.grad_scale = scale
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adjacent_slices_is_the_cat_or_none():
    from framework.zero.optimizer_step import adjacent_slices

    buf = torch.arange(20.0)
    parts = [buf.narrow(0, 2, 3), buf.narrow(0, 5, 4), buf.narrow(0, 9, 1)]
    view = adjacent_slices(parts)
    assert torch.equal(view, torch.cat(parts)) and view.data_ptr() == parts[0].data_ptr()
    assert adjacent_slices([parts[0], parts[2]]) is None  # a gap
    assert adjacent_slices([parts[1], parts[0]]) is None  # out of order
    assert adjacent_slices([parts[0], torch.zeros(4)]) is None  # another tensor (a frozen parameter's zeros)
    assert adjacent_slices([buf.view(4, 5)[:, 0]]) is None  # not contiguous
    assert adjacent_slices([]) is None


@pytest.mark.parametrize("grad_dtype,adjacent", [(torch.bfloat16, True), (torch.bfloat16, False),
                                                 (torch.float32, True)])
def test_stage3_fp32_grad_equals_deepspeeds(grad_dtype, adjacent, monkeypatch):
    """The replacement of ZeRO-3's _prepare_fp32_grad_for_sub_group gives the gradient DeepSpeed 0.19.8's own method
    gives (run side by side on the same state), reading the partitions in place when they are adjacent slices of a
    bf16 buffer and falling back to DeepSpeed otherwise."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from framework.zero import optimizer_step

    monkeypatch.setattr(stage3.dist, "get_rank", lambda group=None: 0)  # DeepSpeed's method asks; no group here

    original = DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group
    original = getattr(original, "__wrapped__", original)  # DeepSpeed's, also after install() replaced it
    torch.manual_seed(0)
    buf = torch.randn(50).to(grad_dtype)
    parts = [buf.narrow(0, 0, 20), buf.narrow(0, 20, 30)]
    if not adjacent:
        parts = [parts[0], torch.zeros(30, dtype=grad_dtype)]  # a parameter without gradient: zeros, not the buffer

    def state():
        return SimpleNamespace(fp32_partitioned_groups_flat=[torch.zeros(50)], averaged_gradients=[list(parts)],
                               offload_optimizer=False, flatten=torch._utils._flatten_dense_tensors,
                               _get_sub_group_process_group=lambda sub_group_id: None,
                               optimizer=None)  # not torch's AdamW: the fp32 gradient is made

    mine, theirs = state(), state()
    optimizer_step._stage3_prepare_fp32_grad(original, mine, 0)
    original(theirs, 0)
    got, want = mine.fp32_partitioned_groups_flat[0].grad, theirs.fp32_partitioned_groups_flat[0].grad
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert mine.averaged_gradients[0] is None and theirs.averaged_gradients[0] is None
    assert got.data_ptr() != buf.data_ptr()  # a new tensor: the fused optimizer may rewrite it


def _zero3_state(parts, fp32, bf16, optimizer, unflattened):
    from types import SimpleNamespace

    return SimpleNamespace(fp32_partitioned_groups_flat=[fp32], averaged_gradients=[list(parts)],
                           fp16_partitioned_groups_flat=[bf16], offload_optimizer=False, swap_optimizer=False,
                           flatten=torch._utils._flatten_dense_tensors,
                           _get_sub_group_process_group=lambda sub_group_id: None, optimizer=optimizer,
                           sub_group_to_group_id={0: 0}, torch_autocast_gradscaler=None, zenflow=False,
                           use_muon=False, loss_scale=1.0, clip_grad=1.0,
                           _unflatten_partitioned_parameters=unflattened.append)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_stage3_in_place_adamw_equals_deepspeeds_step(clip, monkeypatch):
    """ZeRO-3's sub-group step through the replacements (the bf16 gradient slice read in place, one AdamW pass that
    also writes the bf16 partition) against DeepSpeed 0.19.8's own methods with torch's AdamW on the same state:
    prepare (fp32 gradient), unscale and clip, optimizer.step(), fp32 -> bf16 copy; three steps, clipping engaged."""
    from deepspeed.runtime.zero import stage3
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Zero3

    from framework.zero import optimizer_step

    monkeypatch.setattr(stage3.dist, "get_rank", lambda group=None: 0)
    deepspeeds = {name: getattr(getattr(Zero3, name), "__wrapped__", getattr(Zero3, name)) for name in
                  ("_prepare_fp32_grad_for_sub_group", "unscale_and_clip_grads", "_optimizer_step",
                   "_reassign_or_swap_out_partitioned_parameters")}
    torch.manual_seed(0)
    n = 1000
    start = torch.randn(n)
    states = []
    for _ in range(2):
        fp32 = start.clone()
        opt = torch.optim.AdamW([fp32], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        unflattened: list[int] = []
        states.append((_zero3_state([], fp32, fp32.to(torch.bfloat16), opt, unflattened), unflattened))
    (mine, mine_unflat), (theirs, theirs_unflat) = states
    mine.clip_grad = theirs.clip_grad = clip
    for step in range(3):
        buf = (torch.randn(n) * (step + 1)).to(torch.bfloat16)  # norms above the clip: the factor matters
        parts = [buf.narrow(0, 0, 300), buf.narrow(0, 300, n - 300)]
        norm = buf.float().norm()
        mine.averaged_gradients = [list(parts)]
        theirs.averaged_gradients = [list(parts)]
        optimizer_step._stage3_prepare_fp32_grad(deepspeeds["_prepare_fp32_grad_for_sub_group"], mine, 0)
        assert mine.fp32_partitioned_groups_flat[0].grad is None  # no fp32 gradient is made
        optimizer_step._stage3_unscale_and_clip(deepspeeds["unscale_and_clip_grads"], mine, 0, norm)
        optimizer_step._stage3_optimizer_step(deepspeeds["_optimizer_step"], mine, 0)
        optimizer_step._stage3_reassign_partitioned_parameters(
            deepspeeds["_reassign_or_swap_out_partitioned_parameters"], mine, 0)
        for name, args in (("_prepare_fp32_grad_for_sub_group", ()), ("unscale_and_clip_grads", (norm,)),
                           ("_optimizer_step", ()), ("_reassign_or_swap_out_partitioned_parameters", ())):
            deepspeeds[name](theirs, 0, *args)
        theirs.fp32_partitioned_groups_flat[0].grad = None
        fp32_mine, fp32_theirs = mine.fp32_partitioned_groups_flat[0], theirs.fp32_partitioned_groups_flat[0]
        torch.testing.assert_close(fp32_mine, fp32_theirs, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            want = theirs.optimizer.state[fp32_theirs][key]
            # exp_avg's beta1 * m + (1 - beta1) * g cancels where g opposes m: ulps of the terms, not of the result
            torch.testing.assert_close(mine.optimizer.state[fp32_mine][key], want, rtol=1e-6,
                                       atol=2e-7 * want.abs().max().item())
        assert mine.optimizer.state[fp32_mine]["step"].item() == step + 1
        assert torch.equal(mine.fp16_partitioned_groups_flat[0], fp32_mine.to(torch.bfloat16))
    assert mine_unflat == theirs_unflat == [0, 0, 0]
    assert not optimizer_step._pending(mine)


def test_host_step_mirror_follows_the_tensor():
    from framework.zero.optimizer_step import _advance_host_step, _forget_host_step

    step = torch.tensor(5.0)
    assert _advance_host_step(step) == 6 and step.item() == 6.0
    step.add_(1)  # a step torch's optimizer made
    _forget_host_step(step)
    assert _advance_host_step(step) == 8 and step.item() == 8.0
    assert _advance_host_step(torch.tensor(0.0)) == 1  # a state loaded from a checkpoint: new tensor, read once


@pytest.mark.parametrize("stage", [2, 3])
def test_grad_norm_from_per_tensor_norms_equals_deepspeeds(stage, monkeypatch):
    """DeepSpeed 0.19.8's get_grad_norm_direct on the gradients themselves against the same method fed one-element
    tensors holding their norms from one multi-tensor pass (no per-gradient dtype copy); ZeRO-1/2's alignment padding
    is left out of the norm either way."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero import stage3, stage_1_and_2

    from framework.zero import optimizer_step

    module = stage3 if stage == 3 else stage_1_and_2
    cls = stage3.DeepSpeedZeroOptimizer_Stage3 if stage == 3 else stage_1_and_2.DeepSpeedZeroOptimizer
    original = getattr(cls.get_grad_norm_direct, "__wrapped__", cls.get_grad_norm_direct)
    monkeypatch.setattr(module.dist, "all_reduce", lambda tensor, op=None, group=None: None)  # one rank
    torch.manual_seed(0)
    grads = [(torch.randn(n) * s).to(torch.bfloat16) for n, s in [(1000, 1e-3), (37, 1.0), (5, 30.0)]]
    params = [torch.empty_like(g) for g in grads]
    if stage == 2:
        pad = torch.full((3,), 100.0, dtype=torch.bfloat16)
        pad._zero_padding = True  # DeepSpeed's marker: not a parameter's gradient
        grads = grads + [pad]
    fake = SimpleNamespace(model_parallel_rank=0, model_parallel_group=None, dp_process_group=None,
                           device=torch.device("cpu"), _model_parallel_all_reduce=lambda tensor, op: None,
                           _assert_same_partition_group=lambda params: None,
                           _get_param_partition_group=lambda p: None,
                           _grad_norm_counts_every_rank=lambda params, group: False,
                           _autoep_expert_parallel_group=lambda params: None)
    want = original(fake, grads, params)
    got = optimizer_step._grad_norm_from_norms(original, fake, grads, params)
    exact = torch.cat([g.double() for g in grads[:3]]).norm()
    # ZeRO-1/2 return the total in fp32, ZeRO-3 in the norm dtype (fp64 on CPU)
    assert abs(got.item() - want.item()) <= 1e-7 * want.item()
    assert abs(got.item() - exact.item()) <= 1e-7 * exact.item()


def test_installing_twice_wraps_deepspeeds_methods_once():
    """Every engine built in a process installs the replacements again: each DeepSpeed method is wrapped once."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Zero3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero12

    from framework.zero import local_grads, optimizer_step

    names = {Zero3: ("get_grad_norm_direct", "_prepare_fp32_grad_for_sub_group", "_optimizer_step",
                     "_reassign_or_swap_out_partitioned_parameters", "unscale_and_clip_grads",
                     "reduce_independent_p_g_buckets_and_remove_grads"),
             Zero12: ("get_grad_norm_direct", "_optimizer_step", "unscale_and_clip_grads")}
    optimizer_step.install()
    local_grads.install()
    first = {(cls, name): getattr(cls, name) for cls, group in names.items() for name in group}
    optimizer_step.install()
    local_grads.install()
    for (cls, name), method in first.items():
        assert getattr(cls, name) is method, name
        assert not hasattr(method.__wrapped__, "_replaced_by"), name  # wraps DeepSpeed's own method
