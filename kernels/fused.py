"""Launchers of the fused residual + RMSNorm and SwiGLU kernels (kernels/triton_fused.py),
drop-in for kernels/reference.py's add_rmsnorm_reference and swiglu_reference. The model uses
them with the fused attention (Transformer.set_attention("fused")), on tensors that fit by
construction (contiguous rows, one dtype); anything else goes to the reference."""

from __future__ import annotations

import torch
from ckpt_doctor.kernels.reference import (
    add_rmsnorm_reference,
    rope_and_cache_reference,
    swiglu_reference,
)

SWIGLU_BLOCK = 1024
MAX_NORM_WIDTH = 16384  # one program holds a whole row


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, N] without a copy, or None when its last dim is not unit-stride."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:  # leading dims that do not flatten to one stride
        return None


def add_rmsnorm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta) * weight) in one launch (h alone without delta)."""
    h2 = _rows(h)
    d2 = _rows(delta) if delta is not None else h2
    n = h.shape[-1]
    if (
        h2 is None
        or d2 is None
        or (delta is not None and (delta.shape != h.shape or delta.dtype != h.dtype))
        or n > MAX_NORM_WIDTH
        or not weight.is_contiguous()
    ):
        return add_rmsnorm_reference(h, delta, weight, eps)
    h_out = torch.empty_like(h) if delta is not None else h
    y = torch.empty_like(h)
    launch = add_rmsnorm_launch(
        h2, d2, weight, _rows(h_out), y.view(-1, n), eps, has_delta=delta is not None
    )
    _run(launch)
    return h_out, y


def add_rmsnorm_launch(
    h2: torch.Tensor,
    d2: torch.Tensor,
    weight: torch.Tensor,
    ho2: torch.Tensor,
    y2: torch.Tensor,
    eps: float,
    *,
    has_delta: bool,
) -> tuple:
    """(kernel, grid, args, meta) of add_rmsnorm over [rows, N] views; kernels/aot.py
    compiles the same launches."""
    from ckpt_doctor.kernels import triton_fused as tf  # Triton loads here, not at import

    n = h2.shape[1]
    block = max(16, 1 << (n - 1).bit_length())
    args = (h2, d2, weight, ho2, y2, n, eps, h2.stride(0), d2.stride(0), ho2.stride(0),
            y2.stride(0))  # fmt: skip
    meta = {"HAS_DELTA": has_delta, "BLOCK": block, "num_warps": min(16, max(1, block // 256))}
    return tf.add_rmsnorm_kernel, (h2.shape[0],), args, meta


def _run(launch: tuple) -> None:
    kernel, grid, args, meta = launch
    kernel[grid](*args, **meta)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one launch."""
    g2, u2 = _rows(gate), _rows(up)
    if g2 is None or u2 is None or gate.shape != up.shape or gate.dtype != up.dtype:
        return swiglu_reference(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _run(swiglu_launch(g2, u2, out.view(-1, gate.shape[-1])))
    return out


def swiglu_launch(g2: torch.Tensor, u2: torch.Tensor, o2: torch.Tensor) -> tuple:
    from ckpt_doctor.kernels import triton_fused as tf

    n = g2.shape[1]
    grid = (g2.shape[0], (n + SWIGLU_BLOCK - 1) // SWIGLU_BLOCK)
    args = (g2, u2, o2, n, g2.stride(0), u2.stride(0), o2.stride(0))
    return tf.swiglu_kernel, grid, args, {"BLOCK": SWIGLU_BLOCK}


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | torch.Tensor,
    rope: torch.Tensor,
    cos_sin: torch.Tensor | None,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
) -> torch.Tensor:
    """rope_and_cache_reference in one launch (``cos_sin`` [2, max_len, hd/2] fp32: the cos
    and sin of every position's angles; the complex ``rope`` is the reference's)."""
    b, t, h, hd = q.shape
    tensors = (q, k, v, cache_k, cache_v)
    if (
        cos_sin is None
        or hd % 2
        or any(x.stride(-1) != 1 or x.dtype != q.dtype for x in tensors)
        or k.shape != q.shape
        or v.shape != q.shape
    ):
        return rope_and_cache_reference(
            q, k, v, start=start, rope=rope, cos_sin=cos_sin, cache_k=cache_k, cache_v=cache_v
        )
    out = torch.empty(b, h, t, hd, dtype=q.dtype, device=q.device)
    _run(rope_cache_launch(q, k, v, cos_sin, out, cache_k, cache_v, start))
    return out


def rope_cache_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    out: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    start: int | torch.Tensor,
) -> tuple:
    from ckpt_doctor.kernels import triton_fused as tf

    b, t, h, hd = q.shape
    in_memory = isinstance(start, torch.Tensor)
    args = (q, k, v, cos_sin, out, cache_k, cache_v, start if in_memory else q,
            0 if in_memory else start, t, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            cos_sin.stride(0), cos_sin.stride(1), *out.stride()[:3], *cache_k.stride()[:3],
            *cache_v.stride()[:3])  # fmt: skip
    meta = {"HALF": hd // 2, "BLOCK": max(16, 1 << (hd // 2 - 1).bit_length()),
            "POS_IN_MEMORY": in_memory}  # fmt: skip
    return tf.rope_cache_kernel, (b * t, h), args, meta
