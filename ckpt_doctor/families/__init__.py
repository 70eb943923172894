"""Adapter families as data: one module per family (what its files hold, what it trains, its
gate, how its own code loads a file, whether the reference model runs it), and the one place
that tells which family a checkpoint belongs to.

Detection looks at canonical names (keys.canonical_name) and, where names alone cannot tell,
at the saved names and gate shapes. A file with tensors no family and no base naming explains
is the ``unknown`` family: named, and refused by every command that needs the family, never
run as LLaMA-Adapter v1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ckpt_doctor import keys
from ckpt_doctor.errors import UsageError
from ckpt_doctor.families import litgpt, llama_adapter_v1, llama_adapter_v2, peft, peft_lora
from ckpt_doctor.families.gates import (
    GATE_FUNCTIONS,
    TANH_MISMATCH_RATIO,
    apply_gate,
    check_gate_fn,
    describe,
    raw_over_tanh,
    run_gate_fn,
)
from ckpt_doctor.families.spec import Family, Gate, Loader, Prompt

if TYPE_CHECKING:
    from ckpt_doctor.handles import TensorHandle

__all__ = [
    "FAMILIES",
    "GATE_FUNCTIONS",
    "TANH_MISMATCH_RATIO",
    "UNKNOWN",
    "Family",
    "Gate",
    "Loader",
    "Prompt",
    "apply_gate",
    "check_gate_fn",
    "describe",
    "detect_family",
    "family_named",
    "raw_over_tanh",
    "require_runs_here",
    "run_gate_fn",
    "unexplained",
]

LLAMA_ADAPTER_V1 = llama_adapter_v1.FAMILY
LLAMA_ADAPTER_V2_CHAT = llama_adapter_v2.CHAT
LLAMA_ADAPTER_V2_MULTIMODAL = llama_adapter_v2.MULTIMODAL
PEFT_ADAPTION_PROMPT = peft.ADAPTION_PROMPT
PEFT_LORA = peft_lora.FAMILY

# Every family, in the order detection tries them (most specific markers first).
FAMILIES: tuple[Family, ...] = (
    PEFT_LORA,
    PEFT_ADAPTION_PROMPT,
    litgpt.LITGPT_ADAPTER_V2,
    litgpt.LIT_LLAMA_ADAPTER_V2,
    litgpt.LITGPT_ADAPTER,
    litgpt.LIT_LLAMA_ADAPTER,
    LLAMA_ADAPTER_V2_MULTIMODAL,
    LLAMA_ADAPTER_V2_CHAT,
    LLAMA_ADAPTER_V1,
)

UNKNOWN = Family(
    name="unknown",
    title="an adapter format ckpt-doctor does not know",
    namespace="meta",
    markers=(),
    trained=(),
    gate=None,
    prompt=None,
    adapted="last",
    loader=Loader(code="(unknown)", container=None, unexpected="ignored"),
    runs_here=False,
    refusal="ckpt-doctor does not know this adapter format, so it cannot tell which tensors "
    "are the adapter or how its code runs them",
)

# Names a plain model may carry beside its weights: not an adapter.
_AUXILIARY = (
    r"rope\.freqs",  # LLaMA-1 consolidated files
    r"layers\.\d+\.attention\.inner_attention\.rope\.freqs",
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # older HF saves
)
# litgpt / lit-llama model names (their base weights).
_LITGPT_BASE = r"(?:transformer\.(?:wte|ln_f|h\.\d+\.\w+(?:\.\w+)?)|output|lm_head)\.\w+"
_LIT_LLAMA_NAMES = re.compile(r"\.(?:c_attn|rms_[12])\.")


def family_named(name: str) -> Family | None:
    return next((f for f in (*FAMILIES, UNKNOWN) if f.name == name), None)


def detect_family(
    canonical: Iterable[str] | Mapping[str, TensorHandle],
    *,
    saved: Iterable[str] = (),
    container: str | None = None,
) -> Family | None:
    """The family of a checkpoint from its canonical names (a mapping of handles lets gate
    shapes decide between look-alikes), its saved names and the key its weights sit under.
    None: no adapter at all (a base or a full fine-tune); UNKNOWN: tensors nothing explains."""
    handles = canonical if isinstance(canonical, Mapping) else {}
    names = list(canonical)
    saved = [keys.unwrap(n) for n in saved]
    if PEFT_LORA.matches(names):
        return PEFT_LORA
    if PEFT_ADAPTION_PROMPT.matches(names):
        return PEFT_ADAPTION_PROMPT
    if litgpt.LITGPT_ADAPTER.matches(names) or litgpt.LITGPT_ADAPTER_V2.matches(names):
        return _lightning(names, handles, container=container)
    if _multimodal(names, saved):
        return LLAMA_ADAPTER_V2_MULTIMODAL
    for family in (LLAMA_ADAPTER_V2_CHAT, LLAMA_ADAPTER_V1):
        if family.matches(names):
            return family
    return UNKNOWN if unexplained(names) else None


def _multimodal(names: list[str], saved: list[str]) -> bool:
    if LLAMA_ADAPTER_V2_MULTIMODAL.matches(names):
        return True
    # Its LLaMA sits under "llama." while adapter_query stays at the top: a v1 model wrapped
    # as ".llama" would carry llama.adapter_query.weight instead.
    prefix = LLAMA_ADAPTER_V2_MULTIMODAL.loader.own_prefix
    return any(n.startswith(prefix + "layers.") for n in saved) and not any(
        n == prefix + "adapter_query.weight" for n in saved
    )


def _lightning(
    names: list[str], handles: Mapping[str, TensorHandle], *, container: str | None
) -> Family:
    """litgpt or lit-llama: their model names, else the gate's shape ([1, 1, H, 1] is
    litgpt's; [1, H, 1, 1] or a scalar lit-llama's) and litgpt's {'model': ...} file."""
    lit_llama = any(_LIT_LLAMA_NAMES.search(n) for n in names)
    if not lit_llama and not any(".attn.qkv." in n or ".norm_1." in n for n in names):
        gates = [handles[n].shape for n in names if n in handles and n.endswith("gating_factor")]
        lit_llama = container is None and any(
            len(s) < 4 or (len(s) == 4 and s[1] > 1 and s[2] == 1) for s in gates
        )
    v2 = litgpt.LITGPT_ADAPTER_V2.matches(names)
    if lit_llama:
        return litgpt.LIT_LLAMA_ADAPTER_V2 if v2 else litgpt.LIT_LLAMA_ADAPTER
    return litgpt.LITGPT_ADAPTER_V2 if v2 else litgpt.LITGPT_ADAPTER


def unexplained(names: Iterable[str]) -> list[str]:
    """Canonical names that are neither base weights (Meta, HF, litgpt naming) nor auxiliary
    buffers: in a file no family claims, they are an adapter ckpt-doctor does not know."""
    return [
        n
        for n in names
        if not keys.is_base_key(n)
        and not any(re.fullmatch(p, n) for p in _AUXILIARY)
        and not re.fullmatch(_LITGPT_BASE, n)
    ]


def is_trained(family: Family | None, name: str) -> bool:
    """Whether ``family`` trains the tensor (None: no family, nothing is adapter)."""
    return family is not None and family.is_trained(name)


def require_runs_here(family: Family | None, path: object, *, command: str) -> None:
    """Refuse a family the reference model does not run, rather than work on it as if it were
    a v1 file that loads nothing (it would run the plain base, or strip another family's
    own names)."""
    if family is not None and not family.runs_here:
        raise UsageError(
            f"{path} holds a {family.name} adapter; {command} cannot run it: {family.refusal}",
            hint="ckpt-doctor inspect, diff, extract and verify still read it"
            if family is not UNKNOWN
            else "ckpt-doctor inspect lists its tensors",
        )
