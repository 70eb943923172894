"""The bounded-reader contract: numbers read from a file are checked before they are used.

Every size, stride, offset, count and layer index a file claims is checked against the bytes
that exist, and against limits no real LLaMA-family checkpoint comes near, before anything is
allocated or mapped. A claim that fails is UNREADABLE, never an allocation, a hang or a crash.
All checks are O(number of tensors), never O(bytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ckpt_doctor.errors import UnreadableError

# Deepest published LLaMA-family models have ~130 layers; names and configs beyond this are
# damage or an attack (a per-layer list of 10^8 entries is gigabytes).
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 24
MAX_DIM = 1 << 20
MAX_NDIM = 16
# What all views of a file may add up to, beyond its own bytes: tied weights and views of a
# flat buffer share storage (2-3x); anything much larger is claimed, not stored.
VIEW_RATIO = 4
VIEW_SLACK = 64 << 20
_DIGITS = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_HINT = "the file is damaged or was not written by a checkpoint saver; re-copy or re-save it"


def _refuse(where: str, what: str) -> UnreadableError:
    return UnreadableError(f"{where}: {what}", hint=_HINT)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_tuple(value: Any, where: str, what: str) -> tuple[int, ...]:
    """A tuple of plain ints (a shape or strides), or UNREADABLE."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM:
        raise _refuse(where, f"{what} is not a list of at most {MAX_NDIM} integers")
    if not all(is_int(v) for v in value):
        kinds = sorted({type(v).__name__ for v in value if not is_int(v)})
        raise _refuse(where, f"{what} holds {', '.join(kinds)} where integers belong")
    return tuple(value)


class ViewBudget:
    """The logical bytes all tensors of one file may claim (``VIEW_RATIO`` x its size plus
    ``VIEW_SLACK``): a file cannot make the reader hand out more than it could hold."""

    def __init__(self, where: str, file_bytes: int) -> None:
        self.where = where
        self.left = VIEW_RATIO * file_bytes + VIEW_SLACK

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise _refuse(
                self.where,
                f"{what} claims {nbytes} bytes of views; the file's tensors may claim at most "
                f"{VIEW_RATIO}x its size (expanded or overlapping views beyond what it stores)",
            )
        self.left -= nbytes


def check_view(
    where: str,
    *,
    size: Any,
    stride: Any,
    offset: Any,
    itemsize: int,
    storage_bytes: int,
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(size, stride, offset) of a strided view once proven to lie inside its storage.

    Sizes, strides and offset must be non-negative ints; every element the view addresses
    must be inside the storage's ``storage_bytes``; dims of nonzero stride must not overlap
    each other (stride 0 is an expanded dim, which torch's expand() saves as it is)."""
    size = int_tuple(size, where, "the size")
    stride = int_tuple(stride, where, "the stride")
    if len(stride) != len(size):
        raise _refuse(where, f"size has {len(size)} dims but stride has {len(stride)}")
    if not is_int(offset) or offset < 0:
        raise _refuse(where, "the storage offset is not a non-negative integer")
    if any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise _refuse(where, f"negative size or stride ({list(size)}, {list(stride)})")
    elements = storage_bytes // itemsize
    if math.prod(size) == 0:
        if offset > elements:
            raise _refuse(where, f"offset {offset} is past the storage's {elements} elements")
        return size, stride, offset
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= elements:
        raise _refuse(
            where,
            f"the view (offset {offset}, size {list(size)}, stride {list(stride)}) reaches "
            f"element {last} of a storage of {elements}",
        )
    reach = 1  # elements spanned by the dims checked so far, in increasing stride order
    for s, n in sorted((s, n) for n, s in zip(size, stride, strict=True) if s and n > 1):
        if s < reach:
            raise _refuse(where, f"the view's dims overlap (size {list(size)}, stride {stride})")
        reach += (n - 1) * s
    return size, stride, offset


def expanded_dims(size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Dims that repeat one stored slice (stride 0, more than one element)."""
    return tuple(i for i, (n, s) in enumerate(zip(size, stride, strict=True)) if s == 0 and n > 1)


def check_names(where: str, names: Sequence[str]) -> None:
    """Every numeric component of a tensor name (a layer index) below ``MAX_LAYERS``."""
    for name in names:
        for digits in _DIGITS.findall(name):
            if len(digits) > 6 or int(digits) >= MAX_LAYERS:
                shown = name if len(name) <= 120 else name[:117] + "..."
                raise _refuse(
                    where,
                    f"tensor {shown!r} names layer {digits[:12]}{'...' if len(digits) > 12 else ''}"
                    f", beyond any model (at most {MAX_LAYERS} layers)",
                )


# params.json / config.json numbers: (lowest, highest); vocab_size -1 means "the tokenizer's".
_PARAM_RANGES: dict[str, tuple[int, int]] = {
    "dim": (1, MAX_DIM),
    "n_layers": (1, MAX_LAYERS),
    "n_heads": (1, MAX_DIM),
    "n_kv_heads": (1, MAX_DIM),
    "multiple_of": (1, MAX_DIM),
    "ffn_hidden": (1, MAX_DIM * 8),
    "vocab_size": (-1, MAX_VOCAB),
}


def check_params(where: str, params: Mapping[str, Any], *, tensor_bytes: int) -> dict[str, Any]:
    """Model facts from a config, type- and range-checked. ``tensor_bytes`` (0 when the file
    holds no weights) bounds the layer count and vocabulary: each needs at least a byte."""
    out = dict(params)
    for key, (lo, hi) in _PARAM_RANGES.items():
        value = out.get(key)
        if value is None:
            continue
        if not is_int(value):
            raise _refuse(where, f"{key} is {type(value).__name__} {_short(value)}, not an integer")
        if not lo <= value <= hi or (key == "vocab_size" and value == 0):
            raise _refuse(where, f"{key} {_short(value)} is outside {lo}..{hi}")
    eps = out.get("norm_eps")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)):
        raise _refuse(where, f"norm_eps is {type(eps).__name__}, not a number")
    if eps is not None and not (math.isfinite(eps) and 0 <= eps < 1):
        raise _refuse(where, f"norm_eps {eps!r} is not a small non-negative number")
    for key in ("n_layers", "vocab_size"):
        value = out.get(key)
        if tensor_bytes and is_int(value) and value > tensor_bytes:
            raise _refuse(
                where, f"{key} {value} is more than the weights' {tensor_bytes} bytes could hold"
            )
    return out


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "(huge)"
    return text if len(text) <= 40 else text[:37] + "..."
