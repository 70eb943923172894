"""What extract and repair may do to adapter tensors on their way out, and the record of it.

A safetensors adapter written by ``extract --dtype``, or by ``repair`` broadcasting scalar gates
or baking tanh into them, no longer equals its source bit for bit, and need not: its metadata
says which transforms it went through, and ``verify`` applies the same ones to the source
before comparing. One definition of each transform, used by both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ckpt_doctor.families.llama_adapter_v1 import FAMILY as V1

if TYPE_CHECKING:
    import torch

CAST_KEY = "cast_dtype"
BROADCAST_KEY = "gates_broadcast"
TANH_BAKED_KEY = "gate_tanh_baked"
# Gates converted from a family that trains them raw (PEFT, lit-llama): raw inference is what
# their training did, whatever LLaMA-Adapter v1's own training would have applied.
GATE_TRAINED_KEY = "gate_trained"


@dataclass(frozen=True)
class Transforms:
    cast: str | None = None  # every floating tensor cast to this dtype (extract --dtype)
    broadcast: bool = False  # scalar [1] gates broadcast to [1, H, 1, 1] (repair)
    baked: bool = False  # gates hold tanh(g) for raw-gate inference (repair --bake-tanh)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> Transforms:
        md = metadata or {}
        return cls(
            cast=md.get(CAST_KEY) or None,
            broadcast=md.get(BROADCAST_KEY) == "true",
            baked=md.get(TANH_BAKED_KEY) == "true",
        )

    def to_metadata(self) -> dict[str, str]:
        out = {CAST_KEY: self.cast} if self.cast else {}
        if self.broadcast:
            out[BROADCAST_KEY] = "true"
        if self.baked:
            out[TANH_BAKED_KEY] = "true"
        return out

    def __bool__(self) -> bool:
        return bool(self.cast or self.broadcast or self.baked)

    def apply(self, name: str, t: torch.Tensor, *, shape: tuple[int, ...]) -> torch.Tensor:
        """What ``t`` (the source's tensor ``name``) became in a file written with these
        transforms, whose tensor has ``shape``: cast, then broadcast, then bake, as written."""
        import torch

        if self.cast and t.is_floating_point():
            t = t.to(getattr(torch, self.cast))
        if V1.gate_layers([name]):  # a per-head gate (v1 and v2 name them alike)
            if self.broadcast and t.numel() == 1 and tuple(t.shape) != shape:
                t = broadcast_gate(t, heads=shape[1])
            if self.baked:
                t = tanh_gate(t)
        return t


def raw_matches_training(metadata: Mapping[str, str] | None) -> bool:
    """Whether raw-gate inference is what the file's gates were trained for: tanh baked into
    them, or converted from a family that trains raw gates."""
    return tanh_baked(metadata) or (metadata or {}).get(GATE_TRAINED_KEY) == "raw"


def tanh_baked(metadata: Mapping[str, str] | None) -> bool:
    """Whether a file's metadata says its gates were baked with tanh already."""
    return Transforms.from_metadata(metadata).baked


def broadcast_gate(gate: torch.Tensor, *, heads: int) -> torch.Tensor:
    """A legacy scalar [1] gate as the per-head [1, heads, 1, 1] one (the value on every head)."""
    return gate.reshape(1, 1, 1, 1).expand(1, heads, 1, 1).contiguous()


def tanh_gate(gate: torch.Tensor) -> torch.Tensor:
    """tanh(g) in float64, rounded to the gate's own dtype: nothing else changes."""
    import torch

    dtype = gate.dtype if gate.is_floating_point() else torch.float32
    values = np.tanh(gate.detach().to(torch.float64).numpy())
    return torch.from_numpy(values).to(dtype).reshape(gate.shape)
