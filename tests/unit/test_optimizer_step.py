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
