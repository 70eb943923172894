"""The values the command-line choices take, in one torch-free place.

cli.py shows them in ``--help`` without importing torch (inspect and diff never pay for it);
the modules that act on them (loading, smoke, extraction) import them from here.
"""

from __future__ import annotations

DTYPES = ("auto", "float32", "float16", "bfloat16")
# What people type for the floating dtypes; each maps to its name in DTYPES.
DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}
DEVICES = ("auto", "cpu", "cuda")
LOAD_MODES = ("strict", "upstream")
ATTENTION = ("auto", "reference", "fused")
# The families convert writes (from v1, PEFT's adaption prompt, lit-llama).
CONVERT_TARGETS = ("llama-adapter-v1", "peft-adaption-prompt")


def canonical_dtype(name: str) -> str:
    """``bf16`` -> ``bfloat16``; names that are not aliases come back as they are."""
    return DTYPE_ALIASES.get(name.lower(), name)
