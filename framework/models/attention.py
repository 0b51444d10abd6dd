"""Attention over packed documents without a mask: flash-attention varlen kernels through torch.

Owns: the "varlen" attention implementation (registered in transformers' AttentionInterface, so HF's own
Qwen3MoeAttention calls it), the document boundaries it needs (cumulative sequence lengths from position ids), and
`resolve_attention` (what "auto" means on this machine). A [B, 1, S, S] mask costs S^2 memory and pushes sdpa off its
flash kernel; varlen attention runs flash over every document of the packed rows at once, causal inside each.
When every row is one document (no boundaries: the model passes no cu_seqlens) the same implementation runs sdpa's
dense causal kernels, cuDNN first: on H200 at B=4, S=4096, 32/4 heads, forward+backward takes 4.1 ms with cuDNN
against 7.6 ms with varlen flash (benchmarks/attention.py).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_VARLEN_NAME = "varlen"
SUPPORTED_ATTENTION = ("sdpa", "eager", _VARLEN_NAME)


def varlen_attention_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@functools.cache
def varlen_parameters() -> frozenset[str]:
    """The keyword names torch's varlen_attn takes (torch 2.10-2.11 spell causality and GQA differently from 2.13);
    empty without torch.nn.attention.varlen. Read once: inspecting the signature per layer call costs CPU time."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def resolve_attention(name: str | None) -> str:
    """auto: varlen on CUDA where torch has it, else sdpa (which then masks packed documents explicitly)."""
    if name in (None, "auto"):
        return _VARLEN_NAME if varlen_attention_available() else "sdpa"
    if name == _VARLEN_NAME and not varlen_attention_available():
        raise ValueError("attention implementation 'varlen' needs a CUDA GPU and torch.nn.attention.varlen "
                         "(torch >= 2.10); use sdpa or auto")
    return name


def document_boundaries(position_ids_BS: torch.Tensor | None, batch: int, seq: int,
                        device: torch.device) -> torch.Tensor:
    """int32 cumulative document lengths over the flattened B*S tokens: a document starts at every position id 0 and
    at every row start. One device-to-host sync (the number of documents sizes the result)."""
    if position_ids_BS is None:
        return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
    starts = position_ids_BS.expand(batch, seq) == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).squeeze(-1).to(torch.int32)
    return torch.cat([idx, torch.full((1,), batch * seq, dtype=torch.int32, device=device)])


def _varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              cu_seqlens=None, **kwargs):
    """transformers attention-function contract: q/k/v [B, heads, S, D] in, ([B, S, heads, D], None) out."""
    if cu_seqlens is None:
        return _dense_causal_attention(query, key, value, scaling), None
    from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415

    batch, heads, seq, dim = query.shape
    v_dim = value.shape[-1]
    if v_dim != dim:
        # MLA (deepseek_v3): value heads narrower than query/key heads, which the flash varlen kernel does not take.
        # Zero-padded value columns give zero output columns, sliced off below: the same attention.
        value = F.pad(value, (0, dim - v_dim))
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    params = varlen_parameters()
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, seq, seq, scale=scaling, **extra)
    return out.view(batch, seq, heads, dim)[..., :v_dim], None


_DENSE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]


def _dense_causal_attention(query, key, value, scaling):
    """Causal attention over whole rows, q/k/v [B, heads, S, D] -> [B, S, heads, D]; cuDNN first, then flash."""
    with sdpa_kernel(_DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def register_varlen_attention() -> None:
    from transformers import AttentionInterface  # noqa: PLC0415

    AttentionInterface.register(_VARLEN_NAME, _varlen_attention_forward)
