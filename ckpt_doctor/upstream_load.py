"""What a family's own code does when it loads a file: which names its loader is given, which
of those its model has, and whether it raises. The seed bug is this going wrong silently: a
``load_state_dict(strict=False)`` that matches nothing leaves every gate at its zero init.

Pure: names and shapes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ckpt_doctor import keys
from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.families import LLAMA_ADAPTER_V1, PEFT_LORA, Family, peft, peft_lora
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY, gate_key
from ckpt_doctor.families.llama_adapter_v2 import CHAT, MM_LORA, MULTIMODAL, VISUAL
from ckpt_doctor.findings import short_list
from ckpt_doctor.reader import Checkpoint

_CHAT_SUFFIXES = tuple(
    f"{module}.w{w}_{kind}"
    for module, ws in (("attention", "qkvo"), ("feed_forward", "123"))
    for w in ws
    for kind in ("bias", "scale")
)
_MM_BIASES = (
    "attention.wq.bias",
    "attention.wo.bias",
    *(f"feed_forward.w{i}.bias" for i in (1, 2, 3)),
)


@dataclass(frozen=True)
class OwnLoad:
    family: Family
    seen: list[str]  # the names its loader is given (a container's own keys for a nested file)
    matched: list[str]  # those its model has
    model_keys: int  # how many names its model has
    error: str | None = None  # what its loader raises instead of loading
    unexpected: list[str] = field(default_factory=list)

    @property
    def code(self) -> str:
        return self.family.loader.code


def model_names(family: Family, facts: ModelFacts, adapter: AdapterConfig | None) -> set[str]:
    """The parameter names the family's own model has, as its loader matches them."""
    n_layers = facts.n_layers or 0
    base = keys.base_key_names(n_layers)
    layers = range(n_layers)
    if family is peft.ADAPTION_PROMPT:
        adapted = adapter.adapted_layers(n_layers) if adapter is not None else []
        return {peft.own_name(i, w) for i in adapted for w in ("prompt", "gate")}
    if family is PEFT_LORA:
        return _lora_model_names(n_layers, adapter)
    if family is MULTIMODAL:
        names = {f"llama.{n}" for n in base}
        names |= {f"llama.layers.{i}.{s}" for i in layers for s in _MM_BIASES}
        names |= {f"llama.{gate_key(i)}" for i in layers}
        return names | {QUERY_KEY}
    names = {*base, QUERY_KEY}
    if family is CHAT:
        names |= {f"layers.{i}.{s}" for i in layers for s in _CHAT_SUFFIXES}
        # Upstream deletes the gates of the layers it does not adapt.
        adapted = adapter.adapted_layers(n_layers) if adapter is not None else []
        return names | {gate_key(i) for i in adapted}
    return names | {gate_key(i) for i in layers}


def own_load(
    ckpt: Checkpoint, *, family: Family | None, facts: ModelFacts, adapter: AdapterConfig | None
) -> OwnLoad:
    """The file as its family's own code loads it (LLaMA-Adapter v1's example.py when the file
    holds no adapter)."""
    family = family or LLAMA_ADAPTER_V1
    names = model_names(family, facts, adapter)
    if family is MULTIMODAL:
        names |= _multimodal_extras(ckpt)
    container = family.loader.container
    nested = ckpt.container_path
    if container is not None and (not nested or nested[0] != container):
        where = f"top-level keys {short_list(ckpt.top_level_keys)}" if nested else "a flat file"
        return OwnLoad(family, [], [], len(names), error=f"KeyError: {container!r} ({where})")
    if nested and (container is None or len(nested) > 1):
        # Its loader gets the container's own keys, which hold no tensors.
        seen = list(ckpt.top_level_keys) if container is None else [nested[1]]
        return OwnLoad(family, seen, [], len(names), unexpected=seen)
    seen = list(ckpt.tensors)
    matched = [n for n in seen if n in names]
    unexpected = [n for n in seen if n not in names]
    error = None
    if unexpected and family.loader.unexpected == "raises":
        error = f"it refuses unexpected keys: {short_list(unexpected)}"
    return OwnLoad(family, seen, matched, len(names), error, unexpected)


def _multimodal_extras(ckpt: Checkpoint) -> set[str]:
    """v2 multimodal's model also holds the CLIP visual modules (whatever their size), and
    LoRA + new_gate when its released file's config says w_lora (a training checkpoint is the
    model's own state, so what it holds the model has)."""
    names = {n for n in ckpt.tensors if re.fullmatch(VISUAL, n) or n.startswith("clip.")}
    config = ckpt.entries.get("config")
    w_lora = config is None or bool((config.value or {}).get("w_lora"))
    if w_lora:
        lora = MM_LORA.replace(r"layers\.", r"llama\.layers\.")
        names |= {n for n in ckpt.tensors if re.fullmatch(lora, n) or n.endswith(".new_gate")}
    return names


def _lora_model_names(n_layers: int, adapter: AdapterConfig | None) -> set[str]:
    """A PeftModel's names as set_peft_model_state_dict matches them: each targeted linear's
    A and B as saved files name them and as a live model does (adapter "default"), its frozen
    weight as base_layer, every other weight of the LLaMA under base_model.model. The targets
    come from adapter_config.json (PEFT builds the model from it), else from the file."""
    lora = adapter.lora if adapter is not None else None
    settings = lora.settings if lora is not None else None
    # Without a base, the layers the LoRA itself covers.
    covered = [keys.layer_index(m + ".weight") for m in (lora.modules if lora else ())]
    n_layers = max([n_layers, *(i + 1 for i in covered if i is not None)])
    if settings is not None:
        targeted = [m for m in peft_lora.linears(n_layers) if settings.targets(m)]
    else:
        targeted = list(lora.modules) if lora is not None else []
    prefix = peft_lora.PREFIX
    wrapped = {peft_lora.hf_module(m) for m in targeted}
    names = {
        prefix
        + (f"{n[: -len('.weight')]}.base_layer.weight" if n[: -len(".weight")] in wrapped else n)
        for n in peft_lora.hf_base_names(n_layers)
    }
    for module in wrapped:
        for half in "AB":
            names |= {
                f"{prefix}{module}.lora_{half}.weight",
                f"{prefix}{module}.lora_{half}.default.weight",
            }
    return names
