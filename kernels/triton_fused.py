"""Triton kernels for the small steps around the GEMMs of a decode step (math:
kernels/reference.py). At batch 1 a 7B step is GEMV-bound, but eager PyTorch spends about ten
launches per layer on the residual adds and RMSNorms (cast, square, mean, rsqrt, scale, cast,
weight, cast) and two on SwiGLU: each launch costs microseconds of a ~6 ms step.

- ``add_rmsnorm_kernel``: h + delta (the residual add, in the stream's dtype) and the RMSNorm
  of the sum, one program per row, the statistics in fp32, rounded back to the stream's dtype
  before the weight exactly as the reference rounds;
- ``swiglu_kernel``: silu(gate) in fp32, rounded to the input dtype, times up;
- ``rope_cache_kernel``: RoPE of q and k and the KV-cache write in one launch, at a position
  given as an int or read from device memory (the CUDA-graph step), instead of the ~12
  launches of the complex-number RoPE, the transposes and the cache copies.

Nothing here runs at import: kernels/fused.py imports this module on the first launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_rmsnorm_kernel(
    H,  # [rows, N] the residual stream
    D,  # [rows, N] what the last block adds to it (unused without HAS_DELTA)
    W,  # [N] the norm's weight (the stream's dtype, or fp32)
    H_out,  # [rows, N] h + delta (unused without HAS_DELTA)
    Y,  # [rows, N] RMSNorm(h + delta) * weight, in the stream's dtype
    N,
    eps,
    s_h,
    s_d,
    s_ho,
    s_y,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(H + row * s_h + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = h + tl.load(D + row * s_d + offs, mask=mask, other=0.0)
        tl.store(H_out + row * s_ho + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / N + eps)
    normed = (hf * inv).to(H.dtype.element_ty).to(tl.float32)  # back to h's dtype first
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_kernel(G, U, Out, N, s_g, s_u, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + row * s_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + offs, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(U.dtype.element_ty).to(tl.float32)  # silu, rounded
    tl.store(Out + row * s_o + offs, (act * u.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["START", "T"])
def rope_cache_kernel(
    Q,  # [B, T, H, hd] projections (unit stride along hd)
    K,
    V,
    CS,  # [2, max_len, hd/2] fp32: cos, then sin, of each position's angles
    Qo,  # [B, H, T, hd] RoPE(q), what the attention kernels read
    CK,  # [>=B, H, max_len, hd] the caches: RoPE(k) and v land at START .. START+T-1
    CV,
    Pos,  # with POS_IN_MEMORY the position is read here (a CUDA graph's decode step)
    START,
    T,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    s_cs, s_ct,
    s_ob, s_oh, s_ot, s_ckb, s_ckh, s_ckt, s_cvb, s_cvh, s_cvt,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    POS_IN_MEMORY: tl.constexpr,
):  # fmt: skip
    """One (token, head): rotate each pair (2i, 2i+1) of q and k by the position's angle (the
    complex product (x0 + i x1)(cos + i sin) in fp32, as the reference), write q out and k, v
    into the caches."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // T).to(tl.int64)
    t = pid % T
    if POS_IN_MEMORY:
        START = tl.load(Pos).to(tl.int32)
    pos = (START + t).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    cos = tl.load(CS + pos * s_ct + i, mask=m, other=0.0)
    sin = tl.load(CS + s_cs + pos * s_ct + i, mask=m, other=0.0)
    q = Q + b * s_qb + t * s_qt + h * s_qh + 2 * i
    q0, q1 = tl.load(q, mask=m, other=0.0).to(tl.float32), tl.load(q + 1, mask=m, other=0.0)
    q1 = q1.to(tl.float32)
    o = Qo + b * s_ob + h * s_oh + t * s_ot + 2 * i
    tl.store(o, (q0 * cos - q1 * sin).to(Qo.dtype.element_ty), mask=m)
    tl.store(o + 1, (q0 * sin + q1 * cos).to(Qo.dtype.element_ty), mask=m)
    k = K + b * s_kb + t * s_kt + h * s_kh + 2 * i
    k0, k1 = tl.load(k, mask=m, other=0.0).to(tl.float32), tl.load(k + 1, mask=m, other=0.0)
    k1 = k1.to(tl.float32)
    ck = CK + b * s_ckb + h * s_ckh + pos * s_ckt + 2 * i
    tl.store(ck, (k0 * cos - k1 * sin).to(CK.dtype.element_ty), mask=m)
    tl.store(ck + 1, (k0 * sin + k1 * cos).to(CK.dtype.element_ty), mask=m)
    v = V + b * s_vb + t * s_vt + h * s_vh + 2 * i
    cv = CV + b * s_cvb + h * s_cvh + pos * s_cvt + 2 * i
    tl.store(cv, tl.load(v, mask=m, other=0.0), mask=m)
    tl.store(cv + 1, tl.load(v + 1, mask=m, other=0.0), mask=m)
