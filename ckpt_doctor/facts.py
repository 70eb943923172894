"""Model facts (dim, layers, heads, vocab, FFN size) and the adapter config, with their sources.

Pure functions over handle metadata: shapes and dtypes only, never tensor values, except the
gate tensors (a few bytes) used to tell adapted layers from untouched ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.families import (
    LLAMA_ADAPTER_V1,
    V1_QUERY_KEY,
    AdapterFamily,
    detect_family,
    v1_gate_layers,
)
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
    gate_layers = v1_gate_layers(tensors)
    if gate_layers:  # upstream writes a gate for every layer, adapted or not
        put("n_layers", max(gate_layers) + 1, "gate keys")
    query = tensors.get(V1_QUERY_KEY)
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


@dataclass(frozen=True)
class AdapterConfig:
    """A v1 adapter as found: its config, where each number came from, and its tensors."""

    family: AdapterFamily
    keys: tuple[str, ...]
    adapter_len: int | None
    adapter_layer: int | None
    source: str
    query_shape: tuple[int, ...] | None
    gate_layers: dict[int, str]
    args_len: int | None = None
    args_layer: int | None = None
    # When the config came from shapes: the adapter_layer values the rows were tried against
    # (args, metadata, trained gates); empty when nothing says how many layers are adapted.
    layer_candidates: tuple[int, ...] = ()

    def adapted_layers(self, n_layers: int | None) -> list[int]:
        """The last adapter_layer layers; j = 0 is layer n_layers - adapter_layer."""
        if not n_layers or not self.adapter_layer or self.adapter_layer > n_layers:
            return []
        return list(range(n_layers - self.adapter_layer, n_layers))

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "adapter_len": self.adapter_len,
            "adapter_layer": self.adapter_layer,
            "source": self.source,
            "query_shape": list(self.query_shape) if self.query_shape else None,
            "gate_layers": list(self.gate_layers),
            "args": {"adapter_len": self.args_len, "adapter_layer": self.args_layer},
        }


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def adapter_config(
    tensors: Mapping[str, TensorHandle],
    *,
    args: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> AdapterConfig | None:
    """The adapter's config from args / metadata, else from shapes and nonzero gates."""
    family = detect_family(tensors)
    if family is None:
        return None
    found_keys = tuple(family.adapter_keys(tensors))
    if family is not LLAMA_ADAPTER_V1:  # a prompt per layer: [1, L, dim] (PEFT) or [L, dim]
        prompts = family.prompt_layers(tensors)
        shapes = {tuple(tensors[k].shape) for k in prompts.values()}
        shape = shapes.pop() if len(shapes) == 1 else None
        length = shape[-2] if shape and len(shape) >= 2 else None
        layers = len(prompts) or None
        return AdapterConfig(
            family, found_keys, length, layers, "shapes", shape, family.gate_layers(tensors)
        )
    query = tensors.get(V1_QUERY_KEY)
    gates = v1_gate_layers(tensors)
    rows = query.shape[0] if query is not None and len(query.shape) == 2 else None
    a_len = _int_or_none((args or {}).get("adapter_len"))
    a_layer = _int_or_none((args or {}).get("adapter_layer"))
    m_len = _int_or_none(_maybe_int((metadata or {}).get("adapter_len")))
    m_layer = _int_or_none(_maybe_int((metadata or {}).get("adapter_layer")))

    def fits(length: int | None, layer: int | None) -> bool:
        return bool(length and layer and rows is not None and length * layer == rows)

    candidates: tuple[int, ...] = ()
    if fits(a_len, a_layer):
        adapter_len, adapter_layer, source = a_len, a_layer, "args"
    elif fits(m_len, m_layer):
        adapter_len, adapter_layer, source = m_len, m_layer, "metadata"
    else:
        adapter_len, adapter_layer, source = None, None, "shapes"
        trained = _trailing_nonzero_gates(tensors, gates)
        candidates = tuple(dict.fromkeys(x for x in (a_layer, m_layer, trained) if x))
        for layer in candidates:
            if rows and rows % layer == 0:
                adapter_len, adapter_layer = rows // layer, layer
                break
    return AdapterConfig(
        family,
        found_keys,
        adapter_len,
        adapter_layer,
        source,
        tuple(query.shape) if query is not None else None,
        gates,
        a_len,
        a_layer,
        candidates,
    )


def _maybe_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _trailing_nonzero_gates(tensors: Mapping[str, TensorHandle], gates: dict[int, str]) -> int:
    """How many top layers have a nonzero gate: the layers training actually adapted."""
    count = 0
    for layer in sorted(gates, reverse=True):
        if not tensors[gates[layer]].values().any():
            break
        count += 1
    return count
