"""How the projection weights sit in memory for CPU decoding (Transformer.lay_out_weights).

MKL streams a weight at very different speeds by orientation: for one row, a column-major
weight (a transposed view of an [in, out] buffer) ~1.2-1.4x faster than a row-major one, and
one GEMM over the fused q/k/v (w1/w3) buffer beats three (two); for several rows, ``W @ x.T``
on a row-major weight runs ~1.3-2x faster than ``x @ W.T`` (benchmarks/decode_cpu.py measures
it). Same math either way; only the order of the reads differs. A layout is recorded by the
identity of the weights it was made from (layout_key), so a weight swapped in since (an
adapter's file replacing a base tensor, diagnose's arms) makes its group be laid out again.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

# Models up to this width decode with one thread and no layout (generate.cpu_tuned): their
# matmuls take microseconds, and a second thread or a copy costs more than it saves.
SMALL_MODEL_DIM = 512
TRANSPOSE_BLOCK = 64  # rows per block of a transposing copy
# The weights lay_out_weights arranges: the projections and the output.
LAID_OUT = re.compile(
    r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight|output\.weight"
)


class Linear(nn.Linear):
    """nn.Linear whose CPU product follows the weight's memory layout (see lay_out_weights).

    MKL streams a row-major weight fastest as ``W @ x.T`` when several rows multiply it, and a
    column-major one (a transposed view of a [in, out] buffer) fastest as ``x @ W.T`` for a
    single row. Same math either way; only the order of the reads differs."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and rows > 1 and w.is_contiguous():
            flat = x.reshape(rows, x.shape[-1])
            return (w @ flat.t()).t().contiguous().view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w)


def layout_key(
    linears: list[Linear],
    *,
    column_major: bool,
    fused: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple | None:
    """What a group's layout was made from; None (never a match) while a weight is not yet in
    ``dtype`` (loading.load_base leaves the cast to the layout's copy)."""
    if dtype is not None and any(m.weight.dtype != dtype for m in linears):
        return None
    return (column_major, fused, *(id(m.weight) for m in linears))


def lay_out(
    linears: list[Linear], *, column_major: bool, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """Put a group of weights that read the same input in one layout, in ``dtype`` (default:
    theirs), in one copy.

    Column-major: one [in, sum of outs] buffer holding every weight's transpose, returned so the
    group can run as one GEMM; each weight becomes a view into it. Row-major: separate
    contiguous weights (a weight mapped from a file stays the map when it already is so, but
    not at an address BLAS would treat differently). Values and names never change."""
    weights = [m.weight.detach() for m in linears]
    dtype = dtype or weights[0].dtype
    if column_major:
        buffer = torch.empty(weights[0].shape[1], sum(w.shape[0] for w in weights), dtype=dtype)
        col = 0
        for m, w in zip(linears, weights, strict=True):
            view = buffer[:, col : col + w.shape[0]]
            # The transpose and the cast in one pass, a block of rows at a time: one strided
            # copy of a whole weight runs ~2.4x slower (it strides over all of memory).
            for r in range(0, w.shape[0], TRANSPOSE_BLOCK):
                view[:, r : r + TRANSPOSE_BLOCK].copy_(w[r : r + TRANSPOSE_BLOCK].t())
            m.weight = nn.Parameter(view.t(), requires_grad=m.weight.requires_grad)
            col += w.shape[0]
        return buffer
    for m, w in zip(linears, weights, strict=True):
        if w.dtype != dtype:
            w = w.to(dtype)
        elif not w.is_contiguous():
            w = w.contiguous()
        elif w.data_ptr() % 64:
            w = w.clone()
        else:
            continue  # already so: the same tensor, nothing copied
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    return None
