"""Reference LLaMA with LLaMA-Adapter v1, in one readable file (SPEC section 3).

Per adapted layer (the last ``adapter_layer`` of ``n_layers``), with x the normed input:

    Q = RoPE(x Wq)   K = RoPE(x Wk)   V = x Wv
    Ka = P Wk        Va = P Wv                        (frozen wk/wv; no RoPE on the prompt)
    O = softmax_fp32(Q K^T / sqrt(hd) + causal) V + G * softmax_fp32(Q Ka^T / sqrt(hd)) Va
    out = O Wo

The two softmaxes are independent: the adapter adds attention mass, it does not steal it. G is
per head; ``gate_fn`` picks G = gate (upstream inference) or G = tanh(gate) (upstream training).
With every gate 0 the output is exactly the base model's. Parameter names equal upstream's, so
``load_state_dict`` behaves as it does for upstream example.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_doctor.families import apply_gate


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    adapter_len: int = 0
    adapter_layer: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adapted_layers(self) -> range:
        return range(self.n_layers - self.adapter_layer, self.n_layers)


def ffn_hidden_size(dim: int, multiple_of: int) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32, as upstream does
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_table(head_dim: int, length: int, theta: float) -> torch.Tensor:
    """Complex rotations e^{i t f} for positions 0..length-1 (Meta's interleaved pairs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, hd]; rope: [T, hd/2] complex. Adjacent dims (2i, 2i+1) form one pair."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rope[None, :, None, :]).flatten(3)
    return out.type_as(x)


@dataclass
class AdapterKV:
    """Per adapted layer, computed once per load: prompt keys/values and the per-head gate."""

    k: torch.Tensor  # [H, adapter_len, hd]
    v: torch.Tensor  # [H, adapter_len, hd]
    gate: torch.Tensor  # [1, H, 1, 1], fp32, after the gate function


class KVCache:
    """Keys (after RoPE) and values per layer: [B, H, max_len, hd]."""

    def __init__(
        self, args: ModelArgs, batch: int, length: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch, args.n_heads, length, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.dim, bias=False)
        self.wv = nn.Linear(args.dim, args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        # Upstream gives every layer a gate (zero-init); only adapted layers use theirs.
        self.gate = nn.Parameter(torch.zeros(1, args.n_heads, 1, 1))

    def forward(
        self,
        x: torch.Tensor,
        *,
        start: int,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        adapter: AdapterKV | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        cache_k[:b, :, start : start + t] = k.transpose(1, 2)
        cache_v[:b, :, start : start + t] = v.transpose(1, 2)
        keys, values = cache_k[:b, :, : start + t], cache_v[:b, :, : start + t]
        q = q.transpose(1, 2)  # [B, H, T, hd]
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * scale
        if mask is not None:
            scores = scores + mask
        out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), values)
        if adapter is not None:
            a_scores = torch.matmul(q, adapter.k.transpose(1, 2)) * scale
            a_probs = F.softmax(a_scores.float(), dim=-1) * adapter.gate
            out = out + torch.matmul(a_probs.type_as(q), adapter.v)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised N(0, 1) unless built on the meta device for loading.

    (nn.Embedding's own init on meta goes through torch._refs and imports torch._dynamo:
    seconds of start-up and ~70 MB for a tensor about to be replaced anyway.)"""
    weight = torch.empty(rows, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = _embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Row j*adapter_len .. (j+1)*adapter_len-1 is the prompt of adapted layer j.
        self.adapter_query = _embedding(args.adapter_len * args.adapter_layer, args.dim)
        self.rope: torch.Tensor | None = None
        self.adapter_kv: dict[int, AdapterKV] = {}

    def prepare(self, *, gate_fn: str = "raw") -> None:
        """After weights are in place: the RoPE table and the adapter's K/V, once per load."""
        a = self.args
        device = self.tok_embeddings.weight.device
        self.rope = rope_table(a.head_dim, a.max_seq_len * 2, a.rope_theta).to(device)
        with torch.no_grad():
            self.adapter_kv = self.compute_adapter_kv(gate_fn=gate_fn)

    def compute_adapter_kv(self, *, gate_fn: str) -> dict[int, AdapterKV]:
        """Prompt K/V and gates of every adapted layer (differentiable: training calls it)."""
        a = self.args
        if not a.adapter_layer or not a.adapter_len:
            return {}
        prompts = self.adapter_query.weight.reshape(a.adapter_layer, a.adapter_len, a.dim)
        out = {}
        for j, i in enumerate(a.adapted_layers):
            attn = self.layers[i].attention
            p = prompts[j].to(attn.wk.weight.dtype)
            k = attn.wk(p).view(a.adapter_len, a.n_heads, a.head_dim).transpose(0, 1)
            v = attn.wv(p).view(a.adapter_len, a.n_heads, a.head_dim).transpose(0, 1)
            gate = apply_gate(attn.gate.float().reshape(1, -1, 1, 1), gate_fn)
            out[i] = AdapterKV(k.contiguous(), v.contiguous(), gate)
        return out

    def new_cache(self, batch: int, length: int | None = None) -> KVCache:
        w = self.tok_embeddings.weight
        length = length or self.args.max_seq_len
        return KVCache(self.args, batch, length, dtype=w.dtype, device=w.device)

    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache,
        *,
        all_logits: bool = False,
        adapter_kv: dict[int, AdapterKV] | None = None,
    ) -> torch.Tensor:
        """Logits in fp32: of the last position ([B, V]) or, with all_logits, [B, T, V].

        ``adapter_kv`` overrides the K/V cached by prepare() (training passes live ones)."""
        adapter_kv = self.adapter_kv if adapter_kv is None else adapter_kv
        if self.rope is None:
            raise RuntimeError("call prepare() after loading weights")
        _, t = tokens.shape
        h = self.tok_embeddings(tokens)
        rope = self.rope[start : start + t]
        mask = None
        if t > 1:  # causal over the cached prefix and the new tokens
            mask = torch.full((t, start + t), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=start + 1).type_as(h)
        for i, layer in enumerate(self.layers):
            h = h + layer.attention(
                layer.attention_norm(h),
                start=start,
                rope=rope,
                mask=mask,
                cache_k=cache.k[i],
                cache_v=cache.v[i],
                adapter=adapter_kv.get(i),
            )
            h = h + layer.feed_forward(layer.ffn_norm(h))
        h = self.norm(h)
        return self.output(h if all_logits else h[:, -1, :]).float()
