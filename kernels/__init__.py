"""Fused gated attention for LLaMA-Adapter (Triton) and its pure-PyTorch reference.

Installed as ``ckpt_doctor.kernels``. Importing it needs neither Triton nor a GPU: Triton is
imported on the first fused launch. ``gated_attention_reference`` is the oracle the kernels are
tested against and the model's own reference path.
"""

from ckpt_doctor.kernels.launch import (
    KernelInputError,
    check_sizes,
    fused_unavailable_reason,
    gated_attention,
    interpreting,
    per_head_gate,
    triton_problem,
)
from ckpt_doctor.kernels.reference import gated_attention_reference

__all__ = [
    "KernelInputError",
    "check_sizes",
    "fused_unavailable_reason",
    "gated_attention",
    "gated_attention_reference",
    "interpreting",
    "per_head_gate",
    "triton_problem",
]
