"""The gradient norm framework/zero/optimizer_step.py makes DeepSpeed take on CUDA (fp32 accumulation over fp32
gradients, read in place) against DeepSpeed's own (an fp64 copy of each gradient): within 1e-5 relative at the sizes
of real gradient partitions, for one tensor of a billion elements and for a norm of many per-tensor norms."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("numel", [10**6, 10**8, 10**9])
def test_fp32_norm_on_cuda_is_within_1e5_of_fp64(numel):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    g = torch.randn(numel, device="cuda", generator=gen)
    g.mul_(torch.rand(numel, device="cuda", generator=gen).pow_(4))  # uneven magnitudes, as gradients have
    fp64 = g.double().norm().item()
    fp32 = g.norm().item()
    print(f"numel {numel:.0e}: fp32 norm {fp32:.9g} vs fp64 {fp64:.9g}, relative {abs(fp32 - fp64) / fp64:.2e}")
    assert abs(fp32 - fp64) <= 1e-5 * fp64


def test_norm_of_per_tensor_norms_as_deepspeed_combines_them():
    # DeepSpeed: sum over tensors of norm(g)^2 (in the norm dtype), then the square root
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=gen) * s for n, s in [(10**8, 1e-3), (3 * 10**7, 1.0), (7, 1e2)]]
    fp64 = torch.sum(torch.stack([g.double().norm() for g in grads]) ** 2).sqrt().item()
    fp32 = torch.sum(torch.stack([g.norm() for g in grads]) ** 2).sqrt().item()
    assert abs(fp32 - fp64) <= 1e-5 * fp64


def test_per_tensor_norms_of_bf16_gradients_in_one_pass():
    # framework/zero/optimizer_step._grad_norm_from_norms: torch._foreach_norm reads the bf16 partitions and
    # accumulates in fp32 (no fp32 copy of each gradient), within 1e-5 of fp64 over the same bf16 values
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [(torch.randn(n, device="cuda", generator=gen) * s).to(torch.bfloat16)
             for n, s in [(10**8, 1e-3), (3 * 10**7, 1.0), (7, 1e2), (0, 1.0)]]
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    for g, n in zip(grads, norms):
        assert n.dtype == torch.float32
        want = g.double().norm().item()
        assert abs(n.item() - want) <= 1e-5 * max(want, 1e-30), (g.numel(), n.item(), want)
