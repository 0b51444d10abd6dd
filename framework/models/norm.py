"""RMSNorm with transformers' Qwen3MoeRMSNorm's parameter (`weight`, ones at init) and math, in one fused op.

transformers' module runs x.float() -> pow -> mean -> rsqrt -> mul -> .to(bf16) -> mul(weight): seven kernels and
an fp32 copy of x saved for backward, in each of a layer's four norms (input, post-attention, per-head q and k).
torch's rms_norm is one kernel each way on CUDA (fp32 arithmetic inside) and saves x and one fp32 rstd per row.
The only numerical difference: the weight multiplies before the single rounding to bf16 instead of after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
