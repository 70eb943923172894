"""Model facts (dim, layers, heads, vocab, FFN size), with where each number came from.

Pure functions over handle metadata: shapes and dtypes only, never tensor values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.families.llama_adapter_v1 import FAMILY as V1
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY
from ckpt_doctor.handles import TensorHandle


@dataclass(frozen=True)
class ModelFacts:
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    vocab_size: int | None = None
    ffn_hidden: int | None = None
    multiple_of: int | None = None
    norm_eps: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def head_dim(self) -> int | None:
        if self.dim and self.n_heads and self.dim % self.n_heads == 0:
            return self.dim // self.n_heads
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "ffn_hidden": self.ffn_hidden,
            "multiple_of": self.multiple_of,
            "norm_eps": self.norm_eps,
            "sources": self.sources,
        }


def model_facts(
    tensors: Mapping[str, TensorHandle],
    *,
    params: Mapping[str, Any] | None = None,
    fallback: ModelFacts | None = None,
) -> ModelFacts:
    """Facts from params.json first, then tensor shapes, then ``fallback`` (the base's facts)."""
    found: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(name: str, value: Any, source: str) -> None:
        if value is not None and name not in found:
            found[name] = value
            sources[name] = source

    for name in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps", "ffn_hidden"):
        put(name, (params or {}).get(name), "params.json")
    vocab = (params or {}).get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:  # Meta writes -1: "ask the tokenizer"
        put("vocab_size", vocab, "params.json")

    emb = tensors.get("tok_embeddings.weight") or tensors.get("output.weight")
    if emb is not None and len(emb.shape) == 2:
        put("vocab_size", emb.shape[0], f"{emb.name} shape")
        put("dim", emb.shape[1], f"{emb.name} shape")
    norm = tensors.get("norm.weight")
    if norm is not None and len(norm.shape) == 1:
        put("dim", norm.shape[0], "norm.weight shape")
    layers = {keys.layer_index(n) for n in tensors if keys.is_base_key(n)} - {None}
    if layers:
        put("n_layers", max(layers) + 1, "layer keys")
    gate_layers = V1.gate_layers(tensors)  # v2's gates have the same names
    if gate_layers:  # the top layers are adapted: the highest gate is the last layer
        put("n_layers", max(gate_layers) + 1, "gate keys")
    query = tensors.get(QUERY_KEY)
    if query is not None and len(query.shape) == 2:
        put("dim", query.shape[1], "adapter_query width")
    w1 = tensors.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and len(w1.shape) == 2:
        put("ffn_hidden", w1.shape[0], "w1 shape")
    for gate in (tensors[k] for k in gate_layers.values()):
        if len(gate.shape) == 4 and gate.shape[1] > 1:
            put("n_heads", gate.shape[1], "per-head gate shape")
            break
    if fallback is not None:
        for name, source in fallback.sources.items():
            put(name, getattr(fallback, name), f"base {source}")
    head_dim = keys.LLAMA_HEAD_DIM  # only when neither params nor a per-head gate says n_heads
    if "n_heads" not in found and found.get("dim", 0) % head_dim == 0 and found.get("dim"):
        put("n_heads", found["dim"] // head_dim, f"assumed head_dim {head_dim}")
    return ModelFacts(**found, sources=sources)
