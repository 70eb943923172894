"""Chunked value checks: nonfinite / fp16-range scans and float64 tensor comparisons.

Memory stays bounded whatever the tensor size: values are streamed through ``chunks`` and only
one chunk pair is converted to float64 at a time. Bitwise-identical chunks are skipped before
any conversion, which makes comparing mostly-identical multi-GB checkpoints I/O bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ckpt_doctor.handles import DType, TensorHandle, decode

FP16_MAX = 65504.0
# Elements compared bit for bit per chunk (views of the file map cost no memory).
BITWISE_CHUNK_ELEMS = 1 << 23
# Elements converted to float64 per chunk: 8 MiB per operand.
STATS_CHUNK_ELEMS = 1 << 20


@dataclass(frozen=True)
class ValueScan:
    nonfinite: int
    nan: int
    beyond_fp16: int
    max_abs: float


def scan_values(handle: TensorHandle) -> ValueScan:
    """Count NaN/Inf and finite values outside fp16 range (those fp16 inference would break)."""
    # The values are the file's: NaN, Inf and signaling NaNs are what is being counted, not
    # a reason for numpy to print warnings (stderr holds one line per error, nothing else).
    with np.errstate(all="ignore"):
        return _scan_values(handle)


def _scan_values(handle: TensorHandle) -> ValueScan:
    if not handle.is_float:
        return ValueScan(0, 0, 0, 0.0)
    # An expanded view (stride 0) repeats its stored values: scan those once, count each
    # as often as it repeats (10^12 view elements over 16 stored floats is 16 reads).
    handle, repeats = handle.stored()
    # Only dtypes wider than fp16 can hold values that a cast to fp16 turns into Inf.
    wide = handle.dtype.name in ("float32", "float64", "bfloat16")
    nonfinite = nan = beyond = 0
    max_abs = 0.0
    for chunk in handle.chunks(max_elems=STATS_CHUNK_ELEMS):
        if chunk.size == 0:
            continue
        values = decode(chunk, handle.dtype)
        finite = np.isfinite(values)
        n_finite = int(np.count_nonzero(finite))
        if n_finite != values.size:
            nonfinite += values.size - n_finite
            nan += int(np.count_nonzero(np.isnan(values)))
            values = values[finite]
        if values.size:
            mags = np.abs(values)
            max_abs = max(max_abs, float(mags.max()))
            if wide:
                beyond += int(np.count_nonzero(mags > FP16_MAX))
    return ValueScan(nonfinite * repeats, nan * repeats, beyond * repeats, max_abs)


@dataclass(frozen=True)
class Comparison:
    identical: bool
    max_abs: float
    rel_l2: float  # ||a - b|| / ||b||, accumulated in float64
    n_diff: int  # elements whose bits (or, across dtypes, values) differ
    # Across dtypes: the values are equal once the more precise side is rounded to the other's
    # dtype (an fp16 save of an fp32 base, fp32 copies of fp16 weights): a recast, no change.
    equal_when_cast: bool = False


def _same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    # Compare as wide words: 8x fewer elements than bytes, and no float NaN semantics.
    xb, yb = np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)
    if xb.size % 8 == 0:
        xb, yb = xb.view(np.uint64), yb.view(np.uint64)
    return bool(np.array_equal(xb, yb))


def _as_uint(x: np.ndarray) -> np.ndarray:
    return x.view(f"u{x.itemsize}")


def round_to(values: np.ndarray, dtype: DType) -> np.ndarray | None:
    """float64 values rounded to nearest-even in ``dtype``, back as float64; None where no
    rounding is defined here (integers, float8: those compare exactly)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype.name == "float64":
            return values
        if dtype.name in ("float32", "float16"):
            return values.astype(dtype.storage).astype(np.float64)
        if dtype.name == "bfloat16":  # via float32: the top 16 bits, rounded to nearest even
            bits = values.astype(np.float32).view(np.uint32)
            bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
            return np.where(np.isnan(values), values, bits.view(np.float32).astype(np.float64))
    return None


def _equal_rounded(x64: np.ndarray, y64: np.ndarray, dtype: DType) -> bool:
    rounded = round_to(x64, dtype)
    return rounded is not None and bool(np.array_equal(rounded, y64, equal_nan=True))


def compare(a: TensorHandle, b: TensorHandle) -> Comparison:
    """Compare two handles of the same shape. ``b`` is the reference (the base)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if (a.expanded or b.expanded) and a.expanded == b.expanded:
        # Both repeat along the same dims: compare what is stored, weigh it by the repeats.
        (sa, repeats), (sb, _) = a.stored(), b.stored()
        c = compare(sa, sb)
        return replace(c, n_diff=c.n_diff * repeats)
    if a.dtype == b.dtype:
        pairs = zip(
            a.chunks(max_elems=BITWISE_CHUNK_ELEMS),
            b.chunks(max_elems=BITWISE_CHUNK_ELEMS),
            strict=True,
        )
        if all(_same_bits(x, y) for x, y in pairs):
            return Comparison(True, 0.0, 0.0, 0, True)
    return _float64_stats(a, b)


def _float64_stats(a: TensorHandle, b: TensorHandle) -> Comparison:
    with np.errstate(all="ignore"):  # inf - inf, overflowing squares: the result says so
        return _stats(a, b)


def _stats(a: TensorHandle, b: TensorHandle) -> Comparison:
    max_abs = 0.0
    diff_sq = ref_sq = 0.0
    n_diff = 0
    same_dtype = a.dtype == b.dtype
    # Across dtypes: does rounding a to b's dtype give b, or b to a's give a, in every chunk?
    a_as_b = b_as_a = not same_dtype
    pairs = zip(
        a.chunks(max_elems=STATS_CHUNK_ELEMS), b.chunks(max_elems=STATS_CHUNK_ELEMS), strict=True
    )
    for x, y in pairs:
        y64 = decode(y, b.dtype)
        ref_sq += float(np.dot(y64, y64))
        if same_dtype and _same_bits(x, y):
            continue
        x64 = decode(x, a.dtype)
        if not same_dtype and not np.array_equal(x64, y64, equal_nan=True):
            a_as_b = a_as_b and _equal_rounded(x64, y64, b.dtype)
            b_as_a = b_as_a and _equal_rounded(y64, x64, a.dtype)
        with np.errstate(invalid="ignore"):  # equal infs differ by 0, not by inf - inf = NaN
            d = np.where(x64 == y64, 0.0, x64 - y64)
        n_diff += (
            int(np.count_nonzero(_as_uint(x) != _as_uint(y)))
            if same_dtype
            else int(np.count_nonzero(d))
        )
        np.abs(d, out=d)
        m = float(d.max()) if d.size else 0.0
        # NaN is sticky: once a NaN difference is seen the max stays NaN.
        if math.isnan(m) or m > max_abs:
            max_abs = m
        diff_sq += float(np.dot(d, d))
    ref = math.sqrt(ref_sq)
    rel = math.sqrt(diff_sq) / ref if ref > 0 else (0.0 if diff_sq == 0 else math.inf)
    identical = n_diff == 0 and diff_sq == 0
    return Comparison(identical, max_abs, rel, n_diff, identical or a_as_b or b_as_a)
