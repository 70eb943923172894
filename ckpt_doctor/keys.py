"""Key-name facts, kept as data: Meta base names, adapter names, prefixes, nesting keys.

Every other module asks this one which keys are adapter keys, how prefixes are stripped and
which container keys hold a state dict, so each fact has exactly one definition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Prefixes seen in the wild, in the order they are stripped (they can stack: module._orig_mod.).
KNOWN_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "base_model.model.", "llama.")

# Container keys under which training scripts nest the state dict, most common first.
NESTING_KEYS: tuple[str, ...] = ("model", "state_dict", "module", "model_state_dict")

# Top-level entries of a training checkpoint that hold optimizer state.
OPTIMIZER_KEYS: tuple[str, ...] = ("optimizer", "optimizer_state_dict", "optim", "opt")

# Every LLaMA size has head_dim 128: the head count of a weight whose config is missing.
LLAMA_HEAD_DIM = 128

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")

# Meta per-layer tensor names (suffix after "layers.{i}.").
LAYER_SUFFIXES: tuple[str, ...] = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)
GLOBAL_KEYS: tuple[str, ...] = ("tok_embeddings.weight", "norm.weight", "output.weight")
VOCAB_KEYS: tuple[str, ...] = ("tok_embeddings.weight", "output.weight")

# Tensor-parallel split dim of Meta consolidated.NN.pth shards (None: replicated).
_COLUMN_SPLIT = ("wq", "wk", "wv", "w1", "w3")
_ROW_SPLIT = ("wo", "w2")

# HF transformers LLaMA names -> Meta names (HF also reorders q/k rows for its rotary layout:
# keys.hf_rotary and handles.rotary_unpermuted undo that).
HF_TO_META: tuple[tuple[str, str], ...] = (
    (r"^model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^lm_head\.weight$", "output.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"layers.\1.attention.wq.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"layers.\1.attention.wk.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"layers.\1.attention.wv.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"layers.\1.attention.wo.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (
        r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$",
        r"layers.\1.ffn_norm.weight",
    ),
)
_HF_COMPILED = tuple((re.compile(p), r) for p, r in HF_TO_META)


def layer_index(name: str) -> int | None:
    """Layer number of a Meta-named key, or None for global tensors."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def base_key_names(n_layers: int) -> list[str]:
    """Every tensor name a Meta LLaMA base with n_layers layers has."""
    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names += [f"layers.{i}.{s}" for s in LAYER_SUFFIXES]
    return [*names, "norm.weight", "output.weight"]


def is_base_key(name: str) -> bool:
    if name in GLOBAL_KEYS:
        return True
    i = layer_index(name)
    return i is not None and name.split(".", 2)[2] in LAYER_SUFFIXES


def meta_shard_dim(name: str) -> int | None:
    """Concatenation dim of a Meta tensor-parallel shard, None when replicated."""
    if name in ("tok_embeddings.weight",):
        return 1
    if name == "output.weight":
        return 0
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _COLUMN_SPLIT:
        return 0
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _ROW_SPLIT:
        return 1
    return None


_HF_ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k)_proj\.weight$")


def hf_rotary(name: str) -> str | None:
    """ "q" or "k" for an HF q_proj / k_proj weight, whose rows HF stores in its own rotary
    order (reader.Checkpoint.canonical undoes it), else None."""
    m = _HF_ROTARY.match(name)
    return m.group(1) if m else None


def hf_to_meta(name: str) -> str | None:
    for pattern, repl in _HF_COMPILED:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


@dataclass(frozen=True)
class PrefixRewrite:
    """Stripping `prefix` from the keys that carry it; overlap is measured after the rewrite."""

    prefix: str
    keys_with_prefix: int
    total_keys: int


def detect_prefix(names: Iterable[str]) -> PrefixRewrite | None:
    """The known prefix (possibly stacked) carried by most keys, or None."""
    names = list(names)
    if not names:
        return None
    stripped_total = ""
    current = names
    while True:
        for p in KNOWN_PREFIXES:
            with_p = [n for n in current if n.startswith(p)]
            # Majority rule: a prefix on a few stray keys is not the naming scheme.
            if len(with_p) * 2 > len(current):
                stripped_total += p
                current = [n[len(p) :] if n.startswith(p) else n for n in current]
                break
        else:
            break
    if not stripped_total:
        return None
    count = sum(1 for n in names if n.startswith(stripped_total))
    return PrefixRewrite(stripped_total, count, len(names))


def strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name
