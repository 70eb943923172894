"""Adapter families: which keys are adapter keys, and the gate function. One definition each.

LLaMA-Adapter v1 is implemented; PEFT adaption prompt, litgpt and v2 register here later with
the same small interface.
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

    def is_adapter_key(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.key_patterns)

    def adapter_keys(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_adapter_key(n)]


LLAMA_ADAPTER_V1 = AdapterFamily(
    name="llama-adapter-v1",
    description="LLaMA-Adapter v1 (adapter_query prompt + per-layer zero-init gates)",
    key_patterns=(r"adapter_query\.weight", r"layers\.\d+\.attention\.gate"),
)
V1_QUERY_KEY = "adapter_query.weight"
_V1_GATE_RE = re.compile(r"^layers\.(\d+)\.attention\.gate$")

FAMILIES: tuple[AdapterFamily, ...] = (LLAMA_ADAPTER_V1,)


def v1_gate_key(layer: int) -> str:
    return f"layers.{layer}.attention.gate"


def v1_gate_layers(names: Iterable[str]) -> dict[int, str]:
    """Layer index -> gate key, for every v1 gate present."""
    out = {}
    for n in names:
        m = _V1_GATE_RE.match(n)
        if m:
            out[int(m.group(1))] = n
    return dict(sorted(out.items()))


def detect_family(names: Iterable[str]) -> AdapterFamily | None:
    names = list(names)
    for family in FAMILIES:
        if family.adapter_keys(names):
            return family
    return None


def is_adapter_key(name: str) -> bool:
    """True when any known family trains this key."""
    return any(f.is_adapter_key(name) for f in FAMILIES)
