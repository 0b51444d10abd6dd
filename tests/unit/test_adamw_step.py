"""framework.ops.adamw.adamw_step_'s torch path (the CPU path and the Triton kernel's reference) against
torch.optim.AdamW over several steps: low-precision and fp32 gradients, with and without a gradient scale and a
low-precision copy of the params, an odd element count; and its input checks."""

from __future__ import annotations

import pytest
import torch

from framework.ops.adamw import adamw_step_

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1
# torch.optim.AdamW's default (single-tensor) path rounds 1 - lr * wd to fp32, lerps exp_avg and divides before
# multiplying by the step size: fp32 reorderings, a few ulp of each value after 4 steps.
TOL = dict(rtol=1e-6, atol=1e-7)


def assert_matches_adamw(param, exp_avg, exp_avg_sq, ref: torch.Tensor, state: dict) -> None:
    torch.testing.assert_close(param, ref.detach(), **TOL)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], **TOL)
    # beta1 * m + (1 - beta1) * g cancels where g opposes m: the rounding error is ulps of the terms, not of the
    # result, so exp_avg's absolute tolerance scales with its largest element (about 2 ulp of it).
    ref_m = state["exp_avg"]
    torch.testing.assert_close(exp_avg, ref_m, rtol=TOL["rtol"], atol=2e-7 * ref_m.abs().max().item())


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 3.7])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adamw_step_matches_torch_adamw(grad_dtype, scale, out_dtype):
    torch.manual_seed(0)
    n, steps = 10007, 4
    init = torch.randn(n)
    ref = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    param, exp_avg, exp_avg_sq = init.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=out_dtype) if out_dtype is not None else None
    grad_scale = torch.tensor(scale) if scale is not None else None
    for step in range(1, steps + 1):
        # a spread of magnitudes, so that eps matters for some elements
        grad = (torch.randn(n) * torch.logspace(-6, 1, n)[torch.randperm(n)] * (scale or 1.0)).to(grad_dtype)
        grad_before = grad.clone()
        ref.grad = grad.float() / scale if scale is not None else grad.float()
        opt.step()
        adamw_step_(param, grad, exp_avg, exp_avg_sq, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                    weight_decay=WD, step=step, grad_scale=grad_scale, out=out)
        assert torch.equal(grad, grad_before)
        assert_matches_adamw(param, exp_avg, exp_avg_sq, ref, opt.state[ref])
        if out is not None:
            assert torch.equal(out, param.to(out_dtype))


def test_adamw_step_without_weight_decay_or_elements():
    torch.manual_seed(0)
    param, grad = torch.randn(33), torch.randn(33)
    ref = torch.nn.Parameter(param.clone())
    ref.grad = grad.clone()
    torch.optim.AdamW([ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    adamw_step_(param, grad, torch.zeros(33), torch.zeros(33), lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                weight_decay=0.0, step=1)
    torch.testing.assert_close(param, ref.detach(), **TOL)
    empty = torch.empty(0)
    adamw_step_(empty, empty, empty, empty, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, step=1)


def _args(n: int = 8, **over):
    args = dict(param=torch.zeros(n), grad=torch.zeros(n, dtype=torch.bfloat16), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(grad=torch.zeros(9, dtype=torch.bfloat16)), "grad has 9 elements"),
    (dict(exp_avg_sq=torch.zeros(7)), "exp_avg_sq has 7 elements"),
    (dict(param=torch.zeros(8, dtype=torch.bfloat16)), "param must be one of"),
    (dict(exp_avg=torch.zeros(8, dtype=torch.float64)), "exp_avg must be one of"),
    (dict(grad=torch.zeros(8, dtype=torch.int32)), "grad must be one of"),
    (dict(param=torch.zeros(2, 4)), "param must be 1-D"),
    (dict(exp_avg=torch.zeros(16)[::2]), "exp_avg must be 1-D and contiguous"),
    (dict(out=torch.zeros(5, dtype=torch.bfloat16)), "out has 5 elements"),
    (dict(grad_scale=torch.tensor(2.0, dtype=torch.float64)), "grad_scale must be one fp32 element"),
    (dict(step=0), "step counts from 1"),
])
def test_adamw_step_rejects_bad_input(over, match):
    over = dict(over)
    kwargs = dict(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, step=1)
    for key in ("out", "grad_scale", "step"):
        if key in over:
            kwargs[key] = over.pop(key)
    args = _args(**over)
    with pytest.raises(ValueError, match=match):
        adamw_step_(args["param"], args["grad"], args["exp_avg"], args["exp_avg_sq"], **kwargs)


def test_adamw_step_updates_a_param_that_requires_grad():
    # DeepSpeed's ZeRO-1/2 fp32 partitions are leaves that require grad; an optimizer writes them outside autograd
    param = torch.ones(8, requires_grad=True)
    m, v = torch.zeros(8), torch.zeros(8)
    adamw_step_(param, torch.full((8,), 0.5), m, v, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1)
    torch.testing.assert_close(param.detach(), torch.full((8,), 0.9))  # the first step moves by lr: m/sqrt(v) = 1
