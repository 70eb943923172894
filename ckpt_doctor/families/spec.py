"""The shape of what ckpt-doctor knows about an adapter family: data, read from each family's own
code, and a few methods that only read that data.

Names here are *canonical*: the reader's view of a checkpoint, with wrapper segments (DDP, FSDP,
torch.compile) removed, a family's namespace prefix (``llama.``, ``base_model.model.``) removed
and HF LLaMA names mapped to Meta's (keys.canonical_name). A family module fills one Family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

GateFn = Literal["raw", "tanh"]


@dataclass(frozen=True)
class Gate:
    """The per-layer gate that scales the adapter's attention (zero-init: inert until trained)."""

    pattern: str  # canonical name; group 1 is the layer index
    shape: Literal["heads", "scalar", "heads-last"]  # [1, H, 1, 1] | [1] | [1, 1, H, 1]
    trained: GateFn  # the function its training applies to the gate
    inference: GateFn  # the function its own inference applies
    # --gate may pick the other function: only where training and inference disagree upstream
    # (LLaMA-Adapter v1, upstream issue #39); everywhere else the family's own function is used.
    switchable: bool = False


@dataclass(frozen=True)
class Prompt:
    """The learned prompt whose keys/values the adapted layers attend to."""

    pattern: str  # canonical name; with per_layer, group 1 is the layer index
    per_layer: bool  # one tensor per adapted layer (PEFT, litgpt) or one stacked tensor (v1, v2)


@dataclass(frozen=True)
class Loader:
    """How the family's own code loads one of its adapter files into its model."""

    code: str  # what it calls, for messages
    container: str | None  # the key it indexes first (torch.load(path)['model']); None: as is
    unexpected: Literal["ignored", "raises"]  # what it does with names its model lacks
    own_prefix: str = ""  # the prefix its model's names carry ("llama.", "base_model.model.")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    # Whose naming its base weights use: Meta's (v1, v2), HF's (PEFT) or litgpt's / lit-llama's.
    namespace: Literal["meta", "hf", "litgpt", "lit-llama"]
    markers: tuple[str, ...]  # canonical-name patterns: any match identifies the family
    trained: tuple[str, ...]  # canonical-name patterns of every tensor its training changes
    gate: Gate | None
    prompt: Prompt | None
    # Which layers carry the adapter: the last N ("last"), or from a start layer to the top.
    adapted: Literal["last", "from_start"]
    loader: Loader
    runs_here: bool  # the reference model runs it (smoke-generate, verify's logits, diagnose)
    refusal: str = ""  # why it does not, for the commands that need the reference model
    source: str = ""  # where its facts were read (upstream file), for the docs

    def is_trained(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.trained)

    def trained_keys(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_trained(n)]

    def matches(self, names: Iterable[str]) -> bool:
        return any(re.fullmatch(p, n) for n in names for p in self.markers)

    def gate_layers(self, names: Iterable[str]) -> dict[int, str]:
        """Layer index -> gate key, for every gate present."""
        return by_layer(self.gate.pattern, names) if self.gate else {}

    def prompt_layers(self, names: Iterable[str]) -> dict[int, str]:
        """Layer index -> prompt key (families with a prompt tensor per layer)."""
        if self.prompt is None or not self.prompt.per_layer:
            return {}
        return by_layer(self.prompt.pattern, names)

    def __str__(self) -> str:
        return self.name


def by_layer(pattern: str, names: Iterable[str]) -> dict[int, str]:
    found = {int(m.group(1)): n for n in names if (m := re.fullmatch(pattern, n))}
    return dict(sorted(found.items()))
