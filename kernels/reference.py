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
