"""Gated attention in plain PyTorch: the model's reference path and the kernels' oracle.

For queries at positions start .. start+T-1 over the KV cache (keys already RoPE'd) and the
adapter prompt's keys/values (no RoPE), per head h (docs/model.md):

    O = softmax_fp32(Q K^T / sqrt(hd) + causal) V  +  G_h * softmax_fp32(Q Ka^T / sqrt(hd)) Va

The two softmaxes are independent; with G = 0 the result is plain causal attention, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | torch.Tensor,
    adapter_k: torch.Tensor | None = None,
    adapter_v: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, T, hd]; k, v [B, H, >= start+T, hd] (the cache); adapter_k/v [H, La, hd];
    gate [H] fp32, already through the gate function. Returns [B, H, T, hd] in q's dtype.
    ``start`` may be a one-element tensor when T = 1 (as the fused kernels take it)."""
    t = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(start, torch.Tensor):  # one query at a run-time position: mask the cache
        if t != 1:
            raise ValueError(f"a position tensor needs one query, got T={t}")
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        future = torch.arange(k.shape[2], device=q.device) > start.reshape(1)
        scores = scores.masked_fill(future, float("-inf"))
        values = v
    else:
        keys, values = k[:, :, : start + t], v[:, :, : start + t]
        scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    if t > 1:  # query i (position start+i) sees keys 0 .. start+i
        mask = torch.full((t, start + t), float("-inf"), device=q.device)
        scores = scores + torch.triu(mask, diagonal=start + 1).type_as(scores)
    out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), values)
    if adapter_k is None or adapter_v is None or gate is None:
        return out
    a_scores = torch.matmul(q, adapter_k.transpose(1, 2)) * scale
    a_probs = F.softmax(a_scores.float(), dim=-1) * gate.float().view(1, -1, 1, 1)
    return out + torch.matmul(a_probs.type_as(q), adapter_v)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as upstream computes it: normalise in fp32, back to x's dtype, times the weight
    (a weight kept in fp32, as LLaMA-Adapter v2's trained norms are, scales in fp32), in x's
    dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.type_as(x) * weight).type_as(x)


def add_rmsnorm_reference(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream and its norm: (h + delta, RMSNorm(h + delta)); h alone if no
    delta (the first layer's input)."""
    if delta is not None:
        h = h + delta
    return h, rmsnorm_reference(h, weight, eps)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LLaMA's feed-forward activation: silu(x W1) * (x W3)."""
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; rope: [T, hd/2] complex. Adjacent dims (2i, 2i+1) form one pair."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rope[None, :, None, :]).flatten(3)
    return out.type_as(x)


def rope_and_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | torch.Tensor,
    rope: torch.Tensor,
    cos_sin: torch.Tensor | None,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
) -> torch.Tensor:
    """q, k, v [B, T, H, hd] from the projections; ``rope`` [T, hd/2] complex, the rotations
    of positions start .. start+T-1 (``cos_sin``: the fused kernel's table, unused here).
    Writes RoPE(k) and v into the caches [>=B, H, max_len, hd] at those positions (``start``
    a one-element tensor: one token at a position held on the device) and returns RoPE(q)
    as [B, H, T, hd]."""
    b, t = q.shape[:2]
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if isinstance(start, torch.Tensor):
        cache_k[:b].index_copy_(2, start.reshape(1), k.transpose(1, 2))
        cache_v[:b].index_copy_(2, start.reshape(1), v.transpose(1, 2))
    else:
        cache_k[:b, :, start : start + t] = k.transpose(1, 2)
        cache_v[:b, :, start : start + t] = v.transpose(1, 2)
    return q.transpose(1, 2)
