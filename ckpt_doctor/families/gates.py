"""The gate functions, one definition: G = g (raw) or G = tanh(g), and which one a run uses."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ckpt_doctor.errors import UsageError

if TYPE_CHECKING:
    import torch

    from ckpt_doctor.families.spec import Family

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
    """The one gate function: G = g or G = tanh(g)."""
    if function == "raw":
        return gate
    if function == "tanh":
        return gate.tanh()
    raise ValueError(f"unknown gate function {function!r}; expected one of {GATE_FUNCTIONS}")


def raw_over_tanh(g: float) -> float:
    """How much raw-gate inference over-weights the adapter relative to tanh training."""
    return 1.0 if g == 0 else g / math.tanh(g)


def describe(family: Family | None) -> str:
    """The family's gate functions in words (what inspect's gate table says)."""
    gate = family.gate if family is not None else None
    if gate is None:
        return "no gate"
    name = {"raw": "g", "tanh": "tanh(g)"}
    if gate.trained == gate.inference:
        return f"G = {name[gate.inference]} in training and inference"
    return f"G = {name[gate.inference]} at raw inference, {name[gate.trained]} in training"


def run_gate_fn(family: Family | None, requested: str | None) -> str:
    """The gate function a run applies: the family's own inference function unless the user
    picked one (``--gate``), which only a family whose upstream disagrees with itself allows."""
    if requested is not None:
        check_gate_fn(requested)
    gate = family.gate if family is not None else None
    if gate is None:
        return requested or "raw"
    if requested is None or requested == gate.inference or gate.switchable:
        return requested or gate.inference
    raise UsageError(
        f"--gate {requested}: {family.name} applies {gate.inference} gates in its own inference "
        f"(and {gate.trained} in training); ckpt-doctor runs it the same way",
        hint="leave --gate out for this adapter",
    )
