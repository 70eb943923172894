"""Adapter families: which keys are adapter keys, and the gate function. One definition each.

LLaMA-Adapter v1 runs in the reference model. HF PEFT's adaption prompt and litgpt's adapter
are recognised (named, their prompts and gates read); LLaMA-Adapter v2 is not yet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_doctor.errors import UsageError

if TYPE_CHECKING:
    import torch

GATE_FUNCTIONS = ("raw", "tanh")

# Raw-gate inference over-weights the adapter by g / tanh(g) versus tanh-gate training.
TANH_MISMATCH_RATIO = 1.2


def check_gate_fn(name: str) -> None:
    """A gate function name from the user: one of GATE_FUNCTIONS, else a UsageError."""
    if name not in GATE_FUNCTIONS:
        raise UsageError(
            f"unknown gate function {name!r}",
            hint=f"use --gate {' or '.join(GATE_FUNCTIONS)} (raw: upstream inference, "
            "tanh: upstream training)",
        )


def apply_gate(gate: torch.Tensor, function: str) -> torch.Tensor:
    """The one gate function: G = g (upstream inference) or G = tanh(g) (upstream training)."""
    if function == "raw":
        return gate
    if function == "tanh":
        return gate.tanh()
    raise ValueError(f"unknown gate function {function!r}; expected one of {GATE_FUNCTIONS}")


def raw_over_tanh(g: float) -> float:
    """How much raw-gate inference over-weights the adapter relative to tanh training."""
    return 1.0 if g == 0 else g / math.tanh(g)


@dataclass(frozen=True)
class AdapterFamily:
    name: str
    description: str
    key_patterns: tuple[str, ...]
    gate_pattern: str  # one gate tensor per adapted layer; group 1 is the layer index
    prompt_pattern: str | None = None  # per-layer prompts, as gates; None: v1's adapter_query
    # The reference model (smoke-generate, verify, the v1 load checks) runs this family.
    runs_here: bool = False

    def is_adapter_key(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.key_patterns)

    def adapter_keys(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_adapter_key(n)]

    def gate_layers(self, names: Iterable[str]) -> dict[int, str]:
        """Layer index -> gate key, for every gate present."""
        return _by_layer(self.gate_pattern, names)

    def prompt_layers(self, names: Iterable[str]) -> dict[int, str]:
        """Layer index -> prompt key (families with a prompt tensor per layer)."""
        return _by_layer(self.prompt_pattern, names) if self.prompt_pattern else {}


def _by_layer(pattern: str, names: Iterable[str]) -> dict[int, str]:
    found = {int(m.group(1)): n for n in names if (m := re.fullmatch(pattern, n))}
    return dict(sorted(found.items()))


LLAMA_ADAPTER_V1 = AdapterFamily(
    name="llama-adapter-v1",
    description="LLaMA-Adapter v1 (adapter_query prompt + per-layer zero-init gates)",
    key_patterns=(r"adapter_query\.weight", r"layers\.\d+\.attention\.gate"),
    gate_pattern=r"layers\.(\d+)\.attention\.gate",
    runs_here=True,
)
V1_QUERY_KEY = "adapter_query.weight"

# Recognised, so that they are named and never read as a failed v1 load; the reference model
# runs v1 only. Both apply their gates raw, in training and in inference.
PEFT_ADAPTION_PROMPT = AdapterFamily(
    name="peft-adaption-prompt",
    description="HF PEFT adaption prompt (adaption_prompt [1, L, hidden] + adaption_gate [1] "
    "per adapted layer)",
    key_patterns=(r"(?:model\.)?layers\.\d+\.self_attn\.adaption_(?:prompt|gate)",),
    gate_pattern=r"(?:model\.)?layers\.(\d+)\.self_attn\.adaption_gate",
    prompt_pattern=r"(?:model\.)?layers\.(\d+)\.self_attn\.adaption_prompt",
)
LITGPT_ADAPTER = AdapterFamily(
    name="litgpt-adapter",
    description="litgpt / lit-llama adapter (adapter_wte [L, dim] + gating_factor per layer)",
    key_patterns=(r"transformer\.h\.\d+\.attn\.(?:adapter_wte\.weight|gating_factor)",),
    gate_pattern=r"transformer\.h\.(\d+)\.attn\.gating_factor",
    prompt_pattern=r"transformer\.h\.(\d+)\.attn\.adapter_wte\.weight",
)

FAMILIES: tuple[AdapterFamily, ...] = (LLAMA_ADAPTER_V1, PEFT_ADAPTION_PROMPT, LITGPT_ADAPTER)


def require_runs_here(family: AdapterFamily | None, path: object, *, command: str) -> None:
    """Refuse a family the reference model does not run, rather than work on it as if it were
    a v1 file that loads nothing (it would run the plain base, or strip PEFT's own names)."""
    if family is not None and not family.runs_here:
        raise UsageError(
            f"{path} holds a {family.name} adapter; {command} handles llama-adapter-v1 only",
            hint="use it with its own library (PEFT, litgpt); ckpt-doctor inspect still reads it",
        )


def v1_gate_key(layer: int) -> str:
    return f"layers.{layer}.attention.gate"


def v1_gate_layers(names: Iterable[str]) -> dict[int, str]:
    """Layer index -> gate key, for every v1 gate present."""
    return LLAMA_ADAPTER_V1.gate_layers(names)


def detect_family(names: Iterable[str]) -> AdapterFamily | None:
    names = list(names)
    for family in FAMILIES:
        if family.adapter_keys(names):
            return family
    return None


def is_adapter_key(name: str) -> bool:
    """True when any known family trains this key."""
    return any(f.is_adapter_key(name) for f in FAMILIES)
