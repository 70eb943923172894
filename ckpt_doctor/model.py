"""Reference LLaMA with LLaMA-Adapter (v1, v2 chat, and PEFT's adaption prompt, which is v1's
math with one raw gate per layer), in one readable file (docs/model.md).

Per adapted layer (the last ``adapter_layer`` of ``n_layers``), with x the normed input:

    Q = RoPE(L_q(x))   K = RoPE(L_k(x))   V = L_v(x)
    Ka = L_k(P)        Va = L_v(P)                    (frozen projections; no RoPE on the prompt)
    O = softmax_fp32(Q K^T / sqrt(hd) + causal) V + G * softmax_fp32(Q Ka^T / sqrt(hd)) Va
    out = L_o(O)

where every linear is L(x) = W x, or, with LLaMA-Adapter v2's bias-scale tuning, W (x * scale)
+ bias. The two softmaxes are independent: the adapter adds attention mass, it does not steal
it. G is per head; ``gate_fn`` picks G = gate or G = tanh(gate) (the family decides; v1 lets the
user pick, see families/). With every gate 0 (and biases 0, scales 1) the output is exactly the
base model's. Parameter names equal upstream's, so ``load_state_dict`` behaves as it does for
upstream's own scripts. The attention itself is kernels/reference.py (PyTorch) or, with
set_attention("fused"), the Triton kernels beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckpt_doctor.cpu_layout import Linear, lay_out, layout_key
from ckpt_doctor.kernels import (
    check_sizes,
    gated_attention,
    gated_attention_reference,
    per_head_gate,
)
from ckpt_doctor.kernels.fused import add_rmsnorm, rope_and_cache, swiglu
from ckpt_doctor.kernels.reference import (
    add_rmsnorm_reference,
    rmsnorm_reference,
    rope_and_cache_reference,
    swiglu_reference,
)

# The model's tensors fit the kernels by construction (shapes, dtypes, devices; set_attention
# checks head_dim and adapter_len once), so the fused path skips the per-call input checks.
ATTENTION = {
    "reference": gated_attention_reference,
    "fused": functools.partial(gated_attention, check=False),
}
# The steps between the GEMMs that go with each attention path: the residual add with the next
# RMSNorm, SwiGLU, RoPE with the KV-cache write (one Triton launch each on the fused path:
# kernels/fused.py).
AROUND = {
    "reference": (add_rmsnorm_reference, swiglu_reference, rope_and_cache_reference),
    "fused": (add_rmsnorm, swiglu, rope_and_cache),
}


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
    # LLaMA-Adapter v2 chat: every linear gets a learned bias and / or an input scale.
    bias: bool = False
    scale: bool = False
    # Tensor parallel (parallel.py): this process holds 1/shards of the heads, of the FFN
    # width, of the embedding's columns and of the vocabulary rows, as Meta's shards split them.
    shards: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def local_heads(self) -> int:
        return self.n_heads // self.shards

    @property
    def local_dim(self) -> int:  # this process's width of q / k / v (its heads)
        return self.local_heads * self.head_dim

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
        # In fp32, as upstream does; a trained norm kept in fp32 (v2) scales in fp32.
        return rmsnorm_reference(x, self.weight, self.eps)


def rope_table(head_dim: int, length: int, theta: float) -> torch.Tensor:
    """Complex rotations e^{i t f} for positions 0..length-1 (Meta's interleaved pairs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


@dataclass
class AdapterKV:
    """Per adapted layer, computed once per load: prompt keys/values and the per-head gate."""

    k: torch.Tensor  # [H, adapter_len, hd]
    v: torch.Tensor  # [H, adapter_len, hd]
    gate: torch.Tensor  # [H], fp32, after the gate function


# Tensor parallel hooks (parallel.py): sum partial products over the processes in place, or
# gather every process's slice of the last dim.
Reduce = Callable[[torch.Tensor], torch.Tensor]


class KVCache:
    """Keys (after RoPE) and values per layer: [B, H, max_len, hd] (this process's heads)."""

    def __init__(
        self, args: ModelArgs, batch: int, length: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch, args.local_heads, length, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]


def tuned(
    module: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...], args: ModelArgs
) -> None:
    """LLaMA-Adapter v2's per-linear ``<name>_bias`` [out] (zero-init) and ``<name>_scale`` [in]
    (one-init), registered as upstream names them; None when the model has none."""
    for name, (size_in, size_out) in zip(
        names, zip(sizes[::2], sizes[1::2], strict=True), strict=True
    ):
        bias = nn.Parameter(torch.zeros(size_out)) if args.bias else None
        scale = nn.Parameter(torch.ones(size_in)) if args.scale else None
        module.register_parameter(f"{name}_bias", bias)
        module.register_parameter(f"{name}_scale", scale)


def project(
    module: nn.Module, name: str, x: torch.Tensor, *, reduce: Reduce | None = None
) -> torch.Tensor:
    """One linear of a block: W x, or W (x * scale) + bias where the model tunes them.
    ``reduce`` sums a row-parallel product over the processes before the (whole) bias."""
    scale, bias = getattr(module, f"{name}_scale"), getattr(module, f"{name}_bias")
    out = getattr(module, name)(x if scale is None else x * scale)
    if reduce is not None:
        out = reduce(out)
    return out if bias is None else out + bias


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.local_heads, args.head_dim
        dim, local = args.dim, args.local_dim
        self.wq = Linear(dim, local)
        self.wk = Linear(dim, local)
        self.wv = Linear(dim, local)
        self.wo = Linear(local, dim)
        # (in, out) of wq, wk, wv, wo: under tensor parallelism the q/k/v biases and wo's input
        # scale are this process's slice, as upstream's chat_demo.py shards them.
        tuned(self, ("wq", "wk", "wv", "wo"), (dim, local) * 3 + (local, dim), args)
        # Upstream gives every layer a gate (zero-init); only adapted layers use theirs.
        self.gate = nn.Parameter(torch.zeros(1, args.local_heads, 1, 1))
        self.wqkv: torch.Tensor | None = None  # [dim, 3*dim] when laid out column-major
        self.layout: tuple | None = ()  # layout_key of the current layout (): none yet
        self.attend = gated_attention_reference  # or the fused kernels: set_attention()
        self.rope_write = rope_and_cache_reference  # likewise
        self.reduce: Reduce | None = None  # tensor parallel: sums wo's partial products

    def lay_out(self, *, column_major: bool, dtype: torch.dtype | None = None) -> None:
        # Input scales differ per projection: only unscaled q/k/v share one GEMM.
        fuse = column_major and self.wq_scale is None
        group = [self.wq, self.wk, self.wv, self.wo]
        if self.layout == layout_key(group, column_major=column_major, fused=fuse, dtype=dtype):
            return  # (a key of None, weights not yet in ``dtype``, matches no layout)
        self.wqkv = lay_out(group[:3], column_major=fuse, dtype=dtype)
        lay_out([self.wo], column_major=column_major, dtype=dtype)
        self.layout = layout_key(group, column_major=column_major, fused=fuse)

    def forward(
        self,
        x: torch.Tensor,
        *,
        start: int | torch.Tensor,
        rope: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        adapter: AdapterKV | None,
        cos_sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.wqkv is not None:  # one GEMM over the fused column-major buffer
            q, k, v = (x @ self.wqkv).split(self.n_heads * self.head_dim, dim=-1)
            if self.wq_bias is not None:
                q, k, v = q + self.wq_bias, k + self.wk_bias, v + self.wv_bias
        else:
            q, k, v = (project(self, w, x) for w in ("wq", "wk", "wv"))
        heads = (b, t, self.n_heads, self.head_dim)
        # RoPE on q and k, k and v into the cache (at a run-time position for CUDA graphs).
        q = self.rope_write(
            q.view(heads), k.view(heads), v.view(heads), start=start, rope=rope,
            cos_sin=cos_sin, cache_k=cache_k, cache_v=cache_v,
        )  # fmt: skip
        extra = {}
        if adapter is not None:
            extra = {"adapter_k": adapter.k, "adapter_v": adapter.v, "gate": adapter.gate}
        out = self.attend(q, cache_k[:b], cache_v[:b], start=start, **extra)
        return project(self, "wo", out.transpose(1, 2).reshape(b, t, -1), reduce=self.reduce)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.dim, args.ffn_hidden // args.shards
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(hidden, dim)
        self.w3 = Linear(dim, hidden)
        tuned(self, ("w1", "w2", "w3"), (dim, hidden, hidden, dim, dim, hidden), args)
        self.w13: torch.Tensor | None = None  # [dim, 2*hidden] when laid out column-major
        self.layout: tuple | None = ()
        self.reduce: Reduce | None = None  # tensor parallel: sums w2's partial products
        self.act = swiglu_reference  # silu(gate) * up; or the fused kernel: set_attention()

    def lay_out(self, *, column_major: bool, dtype: torch.dtype | None = None) -> None:
        fuse = column_major and self.w1_scale is None
        group = [self.w1, self.w3, self.w2]
        if self.layout == layout_key(group, column_major=column_major, fused=fuse, dtype=dtype):
            return  # (a key of None, weights not yet in ``dtype``, matches no layout)
        self.w13 = lay_out(group[:2], column_major=fuse, dtype=dtype)
        lay_out([self.w2], column_major=column_major, dtype=dtype)
        self.layout = layout_key(group, column_major=column_major, fused=fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:  # one GEMM over the fused column-major buffer
            gate, up = (x @ self.w13).chunk(2, dim=-1)
            if self.w1_bias is not None:
                gate, up = gate + self.w1_bias, up + self.w3_bias
        else:
            gate, up = project(self, "w1", x), project(self, "w3", x)
        return project(self, "w2", self.act(gate, up), reduce=self.reduce)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
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


# Module attributes that describe a weight layout (lay_out_weights); swap_in's undo keeps them.
LAYOUT_ATTRS = ("wqkv", "w13", "layout", "output_layout")


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Meta's shards split the embedding's columns and the output's rows (the vocabulary).
        self.tok_embeddings = _embedding(args.vocab_size, args.dim // args.shards)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size // args.shards)
        self.output_layout: tuple | None = ()
        # Row j*adapter_len .. (j+1)*adapter_len-1 is the prompt of adapted layer j.
        self.adapter_query = _embedding(args.adapter_len * args.adapter_layer, args.dim)
        self.rope: torch.Tensor | None = None
        self.cos_sin: torch.Tensor | None = None
        self.adapter_kv: dict[int, AdapterKV] = {}
        self.add_norm = add_rmsnorm_reference  # or the fused kernel: set_attention()
        # Tensor parallel (parallel.py): every process's last-dim slices, joined; rank 0's copy.
        self.gather: Reduce | None = None
        self.agree: Reduce | None = None
        self.base_info: Any = None  # how loading.load_base filled it (for attach)

    def prepare(self, *, gate_fn: str = "raw", rounded: torch.dtype | None = None) -> None:
        """After weights are in place: the RoPE table and the adapter's K/V, once per load. The
        adapter enters here: ``gate_fn`` is its gate function, ``rounded`` a dtype its prompt
        and gate pass through first (LLaMA-Adapter v2 calls .half() on both)."""
        a = self.args
        device = self.tok_embeddings.weight.device
        self.rope = rope_table(a.head_dim, a.max_seq_len * 2, a.rope_theta).to(device)
        # The same rotations as [cos; sin] rows for the fused RoPE kernel: [2, len, hd/2].
        self.cos_sin = torch.view_as_real(self.rope).permute(2, 0, 1).contiguous()
        with torch.no_grad():
            self.adapter_kv = self.compute_adapter_kv(gate_fn=gate_fn, rounded=rounded)

    def set_attention(self, impl: str) -> None:
        """``reference`` (PyTorch, kernels/reference.py) or ``fused`` (the Triton kernels; the
        caller has checked with kernels.fused_unavailable_reason that they can run here)."""
        if impl not in ATTENTION:
            raise ValueError(f"unknown attention {impl!r}; expected one of {sorted(ATTENTION)}")
        if impl == "fused":
            check_sizes(head_dim=self.args.head_dim, adapter_len=self.args.adapter_len)
        for layer in self.layers:
            layer.attention.attend = ATTENTION[impl]
            layer.attention.rope_write = AROUND[impl][2]
            layer.feed_forward.act = AROUND[impl][1]
        self.add_norm = AROUND[impl][0]

    def lay_out_weights(self, *, rows: int, dtype: torch.dtype | None = None) -> None:
        """Store the projection weights for decoding ``rows`` sequences at once on the CPU
        (cpu_layout.py: column-major and fused for one row, row-major for several). ``dtype``:
        weights still in another dtype (the file's, loading.load_base) are cast in the same
        copy. One group is copied at a time: memory peaks at the weights plus one group."""
        if self.tok_embeddings.weight.device.type != "cpu":
            return
        column_major = rows == 1
        for layer in self.layers:  # each group only when its layout differs (layout_key)
            layer.attention.lay_out(column_major=column_major, dtype=dtype)
            layer.feed_forward.lay_out(column_major=column_major, dtype=dtype)
        out = [self.output]
        if self.output_layout != layout_key(out, column_major=column_major, dtype=dtype):
            lay_out(out, column_major=column_major, dtype=dtype)
            self.output_layout = layout_key(out, column_major=column_major)

    def swap_in(self, args: ModelArgs, state: dict[str, torch.Tensor]) -> Callable[[], None]:
        """Put an adapter into the model: its structure (``args``: prompt rows, adapted layers,
        bias / scale) and its tensors, with any base tensor its file replaces (``state``, by
        parameter name). Returns the undo, which puts every parameter, weight layout and
        the adapter's K/V back as they were: diagnose runs its arms on one loaded base so."""
        saved = [
            (m, dict(m._parameters), {k: getattr(m, k) for k in LAYOUT_ATTRS if hasattr(m, k)})
            for m in self.modules()
        ]
        before = (self.args, self.adapter_kv)
        for name, value in state.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner)
            if attr not in module._parameters:
                raise KeyError(f"{name} is not a parameter of the model")
            setattr(module, attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
        self.args = args

        def undo() -> None:
            for module, params, layout in saved:
                module._parameters.clear()
                module._parameters.update(params)
                for k, v in layout.items():
                    setattr(module, k, v)
            self.args, self.adapter_kv = before

        return undo

    def compute_adapter_kv(
        self, *, gate_fn: str, rounded: torch.dtype | None = None
    ) -> dict[int, AdapterKV]:
        """Prompt K/V (through the layer's own key / value projections, bias and scale
        included) and gates of every adapted layer (differentiable: training calls it)."""
        a = self.args
        if not a.adapter_layer or not a.adapter_len:
            return {}
        prompts = self.adapter_query.weight.reshape(a.adapter_layer, a.adapter_len, a.dim)
        out = {}
        for j, i in enumerate(a.adapted_layers):
            attn = self.layers[i].attention
            p = prompts[j] if rounded is None else prompts[j].to(rounded)
            p = p.to(attn.wk.weight.dtype)
            heads = (a.adapter_len, a.local_heads, a.head_dim)
            k = project(attn, "wk", p).view(heads).transpose(0, 1)
            v = project(attn, "wv", p).view(heads).transpose(0, 1)
            gate = per_head_gate(attn.gate, a.local_heads, gate_fn=gate_fn)
            if rounded is not None:
                gate = gate.to(rounded).float()
            out[i] = AdapterKV(k.contiguous(), v.contiguous(), gate)
        return out

    def new_cache(self, batch: int, length: int | None = None) -> KVCache:
        w = self.tok_embeddings.weight
        length = length or self.args.max_seq_len
        return KVCache(self.args, batch, length, dtype=w.dtype, device=w.device)

    def forward(
        self,
        tokens: torch.Tensor,
        start: int | torch.Tensor,
        cache: KVCache,
        *,
        all_logits: bool = False,
        adapter_kv: dict[int, AdapterKV] | None = None,
    ) -> torch.Tensor:
        """Logits in fp32: of the last position ([B, V]) or, with all_logits, [B, T, V].

        ``adapter_kv`` overrides the K/V cached by prepare() (training passes live ones).
        ``start`` may be a one-element tensor for a one-token step: nothing then depends on a
        host-side position, so the step can be captured once as a CUDA graph and replayed."""
        adapter_kv = self.adapter_kv if adapter_kv is None else adapter_kv
        if self.rope is None:
            raise RuntimeError("call prepare() after loading weights")
        _, t = tokens.shape
        h = self.tok_embeddings(tokens)
        if self.gather is not None:
            h = self.gather(h)
        if isinstance(start, torch.Tensor):  # one token at a position held on the device
            rope = self.rope[start.reshape(1)]
        else:
            rope = self.rope[start : start + t]
        delta = None  # what the last block adds to the residual stream h
        for i, layer in enumerate(self.layers):
            h, a = self.add_norm(h, delta, layer.attention_norm.weight, self.args.norm_eps)
            delta = layer.attention(
                a, start=start, rope=rope, cache_k=cache.k[i], cache_v=cache.v[i],
                adapter=adapter_kv.get(i), cos_sin=self.cos_sin,
            )  # fmt: skip
            h, f = self.add_norm(h, delta, layer.ffn_norm.weight, self.args.norm_eps)
            delta = layer.feed_forward(f)
        _, h = self.add_norm(h, delta, self.norm.weight, self.args.norm_eps)
        logits = self.output(h if all_logits else h[:, -1, :])
        return (logits if self.gather is None else self.gather(logits)).float()
