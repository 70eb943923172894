"""A plain LLaMA + LLaMA-Adapter v1 forward for tests, written from the math in docs/model.md alone.

Deliberately naive: a whole sequence at a time (no KV cache), one head at a time, RoPE with real
cos/sin on interleaved pairs (no complex numbers), and every intermediate in the dtype of the
weights it is given (pass float64 tensors for a float64 reference). It exists to check
``ckpt_doctor.model`` and must not share code with it.

Two switches reproduce known *wrong* variants so tests can show the parity check catches them:
``scale="dim"`` divides scores by sqrt(dim) instead of sqrt(head_dim), and ``rope_on_prompt``
rotates the adapter prompt's keys (positions 0..adapter_len-1) as if they were tokens.
"""

from __future__ import annotations

import math
import re

import torch

Weights = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on x [T, hd]: dims (2i, 2i+1) turn by angle pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    i = torch.arange(hd // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * i / hd)  # [hd/2]
    angle = positions.to(torch.float64)[:, None] * freq[None, :]  # [T, hd/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax written out; entries of -inf get weight 0."""
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    e = shifted.exp()
    return e / e.sum(dim=-1, keepdim=True)


def gate_values(gate: torch.Tensor, n_heads: int, gate_fn: str) -> list[float]:
    """Per-head G: a legacy scalar gate broadcasts to every head."""
    g = gate.detach().to(torch.float64).flatten()
    if g.numel() == 1:
        g = g.repeat(n_heads)
    assert g.numel() == n_heads, f"gate has {g.numel()} values for {n_heads} heads"
    if gate_fn == "tanh":
        g = torch.tanh(g)
    else:
        assert gate_fn == "raw", gate_fn
    return [float(v) for v in g]


def n_layers_of(sd: Weights) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    return max(found) + 1


def attention(
    x: torch.Tensor,
    sd: Weights,
    layer: int,
    *,
    n_heads: int,
    theta: float,
    prompt: torch.Tensor | None,
    gates: list[float] | None,
    scale: str,
    rope_on_prompt: bool,
) -> torch.Tensor:
    """One sequence: x [T, dim] (already normed) -> attention output [T, dim] (after Wo)."""
    p = f"layers.{layer}.attention."
    wq, wk, wv, wo = (sd[p + n + ".weight"] for n in ("wq", "wk", "wv", "wo"))
    t, dim = x.shape
    hd = dim // n_heads
    divisor = math.sqrt(hd if scale == "head_dim" else dim)
    assert scale in ("head_dim", "dim"), scale
    positions = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q_all, k_all, v_all = x @ wq.T, x @ wk.T, x @ wv.T
    if prompt is not None:
        ka_all, va_all = prompt @ wk.T, prompt @ wv.T
    heads = []
    for h in range(n_heads):
        cols = slice(h * hd, (h + 1) * hd)
        q = rotate(q_all[:, cols], positions, theta)
        k = rotate(k_all[:, cols], positions, theta)
        v = v_all[:, cols]
        scores = (q @ k.T) / divisor
        scores = scores.masked_fill(~causal, float("-inf"))
        o = softmax(scores) @ v
        if prompt is not None:
            ka, va = ka_all[:, cols], va_all[:, cols]
            if rope_on_prompt:  # WRONG variant, for tests only
                ka = rotate(ka, torch.arange(ka.shape[0]), theta)
            o = o + gates[h] * (softmax((q @ ka.T) / divisor) @ va)
        heads.append(o)
    return torch.cat(heads, dim=-1) @ wo.T


def reference_logits(
    sd: Weights,
    tokens: torch.Tensor,
    *,
    n_heads: int,
    norm_eps: float = 1e-5,
    theta: float = 10000.0,
    adapter_len: int = 0,
    adapter_layer: int = 0,
    gate_fn: str = "raw",
    scale: str = "head_dim",
    rope_on_prompt: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab] for every position of tokens [B, T], in ``dtype``.

    ``sd`` uses Meta / LLaMA-Adapter v1 names; ``dtype`` defaults to the embedding's dtype and
    every weight is converted to it. ``adapter_layer == 0`` runs the plain base model.
    """
    dtype = dtype or sd["tok_embeddings.weight"].dtype
    sd = {k: v.detach().to(dtype) for k, v in sd.items()}
    n_layers = n_layers_of(sd)
    first_adapted = n_layers - adapter_layer
    out = []
    for seq in tokens:
        h = sd["tok_embeddings.weight"][seq]  # [T, dim]
        for i in range(n_layers):
            prompt = gates = None
            if adapter_layer and adapter_len and i >= first_adapted:
                j = i - first_adapted
                prompt = sd["adapter_query.weight"][j * adapter_len : (j + 1) * adapter_len]
                gates = gate_values(sd[f"layers.{i}.attention.gate"], n_heads, gate_fn)
            p = f"layers.{i}."
            h = h + attention(
                rms_norm(h, sd[p + "attention_norm.weight"], norm_eps),
                sd,
                i,
                n_heads=n_heads,
                theta=theta,
                prompt=prompt,
                gates=gates,
                scale=scale,
                rope_on_prompt=rope_on_prompt,
            )
            xn = rms_norm(h, sd[p + "ffn_norm.weight"], norm_eps)
            w1, w2, w3 = (sd[f"{p}feed_forward.w{n}.weight"] for n in (1, 2, 3))
            a = xn @ w1.T
            h = h + ((a * torch.sigmoid(a)) * (xn @ w3.T)) @ w2.T
        h = rms_norm(h, sd["norm.weight"], norm_eps)
        out.append(h @ sd["output.weight"].T)
    return torch.stack(out)
