"""Key-name facts, kept as data: Meta base names, wrapper segments, namespace prefixes, renames.

Every other module asks this one how a saved name becomes the name the analysis uses (the
*canonical* name), which prefixes were on the way, and which keys are base keys, so each fact
has exactly one definition. Which keys an adapter family trains lives in families/.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Segments that training wrappers insert into parameter names and that are never part of a
# model's own names: DDP's leading "module.", torch.compile's "_orig_mod." (on the model or a
# submodule), FSDP's and activation checkpointing's wrappers (anywhere, per layer too), and
# fairscale's flatten-params wrapper.
WRAPPER_SEGMENTS: tuple[str, ...] = (
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "_fpw_module",
)
LEADING_WRAPPER = "module"  # DDP / DataParallel: only as leading segments (module.module. ...)

# Prefixes that a family's own model puts in front of LLaMA's names: PEFT's wrapper and
# LLaMA-Adapter v2 multimodal's ``self.llama``. On another family's file they stop names
# matching (KEY_PREFIX); on their own family's file they are its naming.
NAMESPACE_PREFIXES: tuple[str, ...] = ("base_model.model.", "llama.")

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
    # PEFT's adaption prompt lives on the attention module it wraps.
    (
        r"^model\.layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$",
        r"layers.\1.attention.adaption_\2",
    ),
)
# HF LLaMA linears -> Meta's, for the tensors PEFT's LoRA adds to them (``<linear>.lora_A.weight``
# [r, in], ``lora_B.weight`` [out, r]; DoRA's ``lora_magnitude_vector``; embedding LoRA).
HF_LINEARS: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj", "attention.wq"),
    ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"),
    ("self_attn.o_proj", "attention.wo"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.down_proj", "feed_forward.w2"),
    ("mlp.up_proj", "feed_forward.w3"),
)
_LORA_PARTS = r"(lora_(?:A|B|E)\.(?:weight|bias)|lora_magnitude_vector|lora_embedding_[AB])"
LORA_TO_META: tuple[tuple[str, str], ...] = (
    *(
        (rf"^model\.layers\.(\d+)\.{re.escape(hf)}\.{_LORA_PARTS}$", rf"layers.\1.{meta}.\2")
        for hf, meta in HF_LINEARS
    ),
    (rf"^lm_head\.{_LORA_PARTS}$", r"output.\1"),
    (rf"^model\.embed_tokens\.{_LORA_PARTS}$", r"tok_embeddings.\1"),
)
# Renames inside other namespaces, applied before HF_TO_META: PEFT's adaption prompt wraps each
# LLaMA attention module as ``self_attn.model``; litgpt's adapter_v2 moves every frozen linear
# weight to ``<linear>.linear.weight`` (its adapter_bias/adapter_scale sit beside it). PEFT's
# LoRA: since PEFT 0.7 the frozen weight of a wrapped linear is ``<linear>.base_layer.weight``
# (before: ``<linear>.weight``), and a live PeftModel's state dict names the adapter
# (``lora_A.default.weight``; PEFT <= 0.2 and every saved adapter file: ``lora_A.weight``).
WRAPPED_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(model\.layers\.\d+\.self_attn)\.model\.", r"\1."),
    (r"^((?:transformer\.h\.\d+\.\w+\.\w+)|lm_head)\.linear\.(weight|bias)$", r"\1.\2"),
    (r"\.base_layer\.(weight|bias)$", r".\1"),
    (r"\.(lora_[ABE])\.(?!weight$|bias$)[^.]+\.(weight|bias)$", r".\1.\2"),
    (r"\.(lora_embedding_[AB])\.[^.]+$", r".\1"),
    (r"\.lora_magnitude_vector\.[^.]+(?:\.weight)?$", ".lora_magnitude_vector"),
)
_WRAPPED_COMPILED = tuple((re.compile(p), r) for p, r in WRAPPED_RENAMES)
_HF_COMPILED = tuple((re.compile(p), r) for p, r in (*HF_TO_META, *LORA_TO_META))


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


# A LoRA's B [out, r] on q_proj / k_proj has its rows in the same order as the weight's.
_HF_ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k)_proj\.(?:lora_B\.)?weight$")


def hf_rotary(name: str) -> str | None:
    """ "q" or "k" for an HF q_proj / k_proj weight (or a LoRA B on it), whose rows HF stores
    in its own rotary order (reader.Checkpoint.canonical undoes it), else None."""
    m = _HF_ROTARY.match(name)
    return m.group(1) if m else None


def hf_to_meta(name: str) -> str | None:
    for pattern, repl in _HF_COMPILED:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def unwrap(name: str) -> str:
    """``name`` without wrapper segments (module., _orig_mod., _fsdp_wrapped_module., ...)."""
    parts = name.split(".")
    lead = 0
    while lead < len(parts) - 1 and parts[lead] in (LEADING_WRAPPER, *WRAPPER_SEGMENTS):
        lead += 1
    kept = [p for p in parts[lead:-1] if p not in WRAPPER_SEGMENTS]
    return ".".join([*kept, parts[-1]])


def namespace_prefix(name: str) -> str:
    """The namespace prefix an unwrapped name carries ("" when none)."""
    return next((p for p in NAMESPACE_PREFIXES if name.startswith(p)), "")


def model_name(name: str) -> str:
    """The name in its own model's scheme (HF, Meta, litgpt...): wrappers and a namespace
    prefix removed, wrapped modules renamed back; no mapping between schemes yet."""
    name = unwrap(name)
    name = name.removeprefix(namespace_prefix(name))
    for pattern, repl in _WRAPPED_COMPILED:
        name = pattern.sub(repl, name)
    return name


def canonical_name(name: str) -> str:
    """The name the analysis uses: model_name, with HF LLaMA names mapped to Meta's. Names of
    other models (litgpt) stay in their own scheme."""
    name = model_name(name)
    return hf_to_meta(name) or name


@dataclass(frozen=True)
class PrefixRewrite:
    """What the saved names carry on top of canonical ones: wrapper segments and a namespace
    prefix, each with how many keys carry it."""

    wrappers: dict[str, int]  # "module." / "_fsdp_wrapped_module." ... -> keys carrying it
    namespace: dict[str, int]  # "llama." / "base_model.model." -> keys carrying it
    total_keys: int

    def foreign(self, own_prefix: str = "") -> list[str]:
        """What stops a family whose names start with ``own_prefix`` matching these keys."""
        return [*self.wrappers, *(p for p in self.namespace if p != own_prefix)]

    def keys_with(self, prefixes: Iterable[str]) -> int:
        counts = {**self.wrappers, **self.namespace}
        return max((counts[p] for p in prefixes if p in counts), default=0)


def detect_prefix(names: Iterable[str]) -> PrefixRewrite | None:
    """Wrapper segments and namespace prefixes found on any name (in the order they appear in
    the names), or None."""
    names = list(names)
    wrappers: dict[str, int] = {}
    namespace: dict[str, int] = {}
    for n in names:
        parts = n.split(".")[:-1]
        lead = 0
        while lead < len(parts) and parts[lead] == LEADING_WRAPPER:
            lead += 1
        seen = [LEADING_WRAPPER] if lead else []
        seen += [p for p in dict.fromkeys(parts) if p in WRAPPER_SEGMENTS]
        for segment in seen:
            wrappers[segment + "."] = wrappers.get(segment + ".", 0) + 1
        prefix = namespace_prefix(unwrap(n))
        if prefix:
            namespace[prefix] = namespace.get(prefix, 0) + 1
    if not wrappers and not namespace:
        return None
    return PrefixRewrite(wrappers, namespace, len(names))


def own_name(name: str, own_prefix: str = "") -> str:
    """The name a family's own code expects for a saved name: wrappers removed, and a namespace
    prefix other than the family's own removed."""
    name = unwrap(name)
    prefix = namespace_prefix(name)
    return name if prefix == own_prefix else name.removeprefix(prefix)
