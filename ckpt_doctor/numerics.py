"""Chunked value checks: nonfinite / fp16-range scans and float64 tensor comparisons.

Memory stays bounded whatever the tensor size: values are streamed through ``chunks`` and only
one chunk pair is converted to float64 at a time. Bitwise-identical chunks are skipped before
any conversion, which makes comparing mostly-identical multi-GB checkpoints I/O bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ckpt_doctor.handles import TensorHandle

FP16_MAX = 65504.0
# Raw bytes compared per chunk (a view on mmap-backed tensors costs no memory).
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
    if not handle.is_float:
        return ValueScan(0, 0, 0, 0.0)
    wide = handle.dtype not in (torch.float16,) and handle.dtype.itemsize >= 2
    nonfinite = nan = beyond = 0
    max_abs = 0.0
    for chunk in handle.chunks(max_elems=STATS_CHUNK_ELEMS):
        if chunk.numel() == 0:
            continue
        finite = torch.isfinite(chunk)
        n_finite = int(finite.sum())
        if n_finite != chunk.numel():
            nonfinite += chunk.numel() - n_finite
            nan += int(torch.isnan(chunk).sum())
        mags = chunk.abs()
        if n_finite != chunk.numel():
            mags = mags[finite]
        if mags.numel():
            max_abs = max(max_abs, float(mags.max()))
            if wide:
                beyond += int((mags > FP16_MAX).sum())
    return ValueScan(nonfinite, nan, beyond, max_abs)


@dataclass(frozen=True)
class Comparison:
    identical: bool
    max_abs: float
    rel_l2: float  # ||a - b|| / ||b||, accumulated in float64
    n_diff: int  # elements whose bits differ


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def compare(a: TensorHandle, b: TensorHandle) -> Comparison:
    """Compare two handles of the same shape. ``b`` is the reference (the base)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.dtype == b.dtype:
        pairs = zip(
            a.chunks(max_elems=BITWISE_CHUNK_ELEMS),
            b.chunks(max_elems=BITWISE_CHUNK_ELEMS),
            strict=True,
        )
        if all(torch.equal(_bits(x), _bits(y)) for x, y in pairs):
            return Comparison(True, 0.0, 0.0, 0)
    return _float64_stats(a, b)


def _float64_stats(a: TensorHandle, b: TensorHandle) -> Comparison:
    max_abs = 0.0
    diff_sq = ref_sq = 0.0
    n_diff = 0
    same_dtype = a.dtype == b.dtype
    pairs = zip(
        a.chunks(max_elems=STATS_CHUNK_ELEMS), b.chunks(max_elems=STATS_CHUNK_ELEMS), strict=True
    )
    for x, y in pairs:
        y64 = y.to(torch.float64)
        ref_sq += float((y64 * y64).sum())
        if same_dtype and torch.equal(_bits(x), _bits(y)):
            continue
        d = x.to(torch.float64) - y64
        if same_dtype:
            width = x.element_size()
            n_diff += int((_bits(x).view(-1, width) != _bits(y).view(-1, width)).any(1).sum())
        else:
            n_diff += int((d != 0).sum())
        d.abs_()
        m = float(d.max()) if d.numel() else 0.0
        # NaN is sticky: once a NaN difference is seen the max stays NaN.
        if math.isnan(m) or m > max_abs:
            max_abs = m
        diff_sq += float((d * d).sum())
    ref = math.sqrt(ref_sq)
    rel = math.sqrt(diff_sq) / ref if ref > 0 else (0.0 if diff_sq == 0 else math.inf)
    return Comparison(n_diff == 0 and diff_sq == 0, max_abs, rel, n_diff)
