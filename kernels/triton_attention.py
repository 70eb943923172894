"""Triton kernels for LLaMA-Adapter gated attention (math: kernels/reference.py, docs/model.md).

Prefill: flash-style causal attention with an online softmax (fp32 statistics, base-2
exponentials with the 1/sqrt(hd) scale folded in), one program per (query block, head, batch).
The adapter term G_h * softmax(Q Ka^T / sqrt(hd)) Va is an independent softmax over at most a
few dozen prompt rows, so it is added in the epilogue from one tile.

Decode (one query per row): the cache is split into chunks so that heads x splits fill the GPU;
each program reduces its chunk to a normalised partial output and its log-sum-exp, and a
combine program per (batch, head) merges the partials by log-sum-exp and adds the adapter term.
The position may be read from device memory, with the grid sized for the whole cache, so that
one captured CUDA graph serves every decode step.

Sizes and positions that change from call to call (T, START, SPLITS, ...) are marked
do_not_specialize: Triton would otherwise compile a new variant whenever one of them changes
divisibility by 16 or equals 1, stalling a generation midway. Strides keep their specialisation.

Nothing here runs at import: this module needs Triton, and kernels/launch.py imports it lazily.
"""

from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Compiled kernels are cached on disk by Triton itself (TRITON_CACHE_DIR, ~/.triton/cache);
# the prefill autotuner's choice is cached there too where Triton can (cache_results, 3.3+), so
# a second process neither recompiles nor re-benchmarks.
AUTOTUNE_CACHE = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
    else {}
)  # fmt: skip

if INTERPRET:  # the interpreter runs every config; one small one keeps CPU tests quick
    PREFILL_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
else:
    PREFILL_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 4),
        ]
    ]


@triton.jit
def _adapter_tile(
    q,  # [ROWS, BLOCK_D] in the input dtype (ROWS >= 16 for tl.dot)
    KA,
    VA,
    h,
    G,
    s_kah,
    s_kaa,
    s_kad,
    s_vah,
    s_vaa,
    s_vad,
    LA,
    scale_log2,
    offs_d,
    d_mask,
    BLOCK_A: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """G_h * softmax(q Ka^T * scale) Va for one tile of queries, in fp32."""
    offs_a = tl.arange(0, BLOCK_A)
    a_mask = offs_a < LA
    ka = tl.load(
        KA + h * s_kah + offs_a[None, :] * s_kaa + offs_d[:, None] * s_kad,
        mask=a_mask[None, :] & d_mask[:, None],
        other=0.0,
    )
    s = tl.dot(q, ka, input_precision=PRECISION)
    s = tl.where(a_mask[None, :], s * scale_log2, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    va = tl.load(
        VA + h * s_vah + offs_a[:, None] * s_vaa + offs_d[None, :] * s_vad,
        mask=a_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    pv = tl.dot(p.to(va.dtype), va, input_precision=PRECISION)
    return tl.load(G + h) * pv


@triton.jit
def _key_block(
    q,  # [BLOCK_M, BLOCK_D] queries, input dtype
    k_base,
    v_base,
    n0,
    hi,
    q_pos,
    s_kt,
    s_kd,
    s_vt,
    s_vd,
    offs_d,
    d_mask,
    m_i,
    l_i,
    acc,
    scale_log2,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over keys n0 .. n0+BLOCK_N-1; returns the new (m, l, acc).
    Off the band (not CAUSAL) every key is below ``hi`` and visible to every query."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    k = tl.load(
        k_base + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
        mask=n_mask[None, :] & d_mask[:, None],
        other=0.0,
    )
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    if CAUSAL:  # query at q_pos sees keys 0 .. q_pos (this also hides keys >= hi)
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
        mask=n_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    """fp32 tiles (PRECISION "ieee") take twice the shared memory of fp16 ones: keep the small
    ones, which fit an A100's 163 KiB (64x64 and up do not: python -m ckpt_doctor.kernels.aot)."""
    if kwargs.get("PRECISION") != "ieee":
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32]
    return small or configs[-1:]


@triton.autotune(
    configs=PREFILL_CONFIGS,
    key=["HEAD_DIM", "T_BUCKET", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    **AUTOTUNE_CACHE,
)
@triton.jit(do_not_specialize=["T", "START", "LA", "T_BUCKET"])
def gated_prefill_kernel(
    Q,
    K,
    V,
    KA,
    VA,
    G,
    Out,
    s_qb,
    s_qh,
    s_qt,
    s_qd,
    s_kb,
    s_kh,
    s_kt,
    s_kd,
    s_vb,
    s_vh,
    s_vt,
    s_vd,
    s_kah,
    s_kaa,
    s_kad,
    s_vah,
    s_vaa,
    s_vad,
    s_ob,
    s_oh,
    s_ot,
    s_od,
    T,
    START,
    LA,
    scale_log2,
    T_BUCKET,  # autotune key only: log2 of T, so configs are tuned per size class
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_A: tl.constexpr,
    HAS_ADAPTER: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid (query blocks, heads, batch): each axis within CUDA's limits for any real batch,
    # and the blocks of one head run side by side, sharing its K/V in L2.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * batch stride passes 2**31 for big caches
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows among the T new tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_valid = offs_m < T
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
        mask=m_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = START + offs_m  # absolute positions; query at q_pos sees keys 0 .. q_pos
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below the block's first query position need no causal mask: the off-band part runs
    # in a loop of its own, since a masked branch inside one loop serialises Hopper's wgmma.
    band_lo = ((START + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(START + (pid_m + 1) * BLOCK_M, START + T)
    for n0 in range(0, band_lo, BLOCK_N):
        m_i, l_i, acc = _key_block(
            q, k_base, v_base, n0, hi, q_pos, s_kt, s_kd, s_vt, s_vd, offs_d, d_mask,
            m_i, l_i, acc, scale_log2, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    for n0 in range(band_lo, hi, BLOCK_N):  # the diagonal band
        m_i, l_i, acc = _key_block(
            q, k_base, v_base, n0, hi, q_pos, s_kt, s_kd, s_vt, s_vd, offs_d, d_mask,
            m_i, l_i, acc, scale_log2, BLOCK_N, True, PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    if HAS_ADAPTER:
        out += _adapter_tile(
            q, KA, VA, h, G, s_kah, s_kaa, s_kad, s_vah, s_vaa, s_vad, LA, scale_log2,
            offs_d, d_mask, BLOCK_A, PRECISION,
        )  # fmt: skip
    tl.store(
        Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & d_mask[None, :],
    )


@triton.jit(do_not_specialize=["START", "CHUNK", "SPLITS"])
def decode_partial_kernel(
    Q,
    K,
    V,
    Part,  # [B*H, SPLITS, BLOCK_D] fp32: each split's normalised output
    Lse,  # [B*H, SPLITS] fp32: each split's log2-sum-exp2 of its scaled scores
    s_qb,
    s_qh,
    s_qd,
    s_kb,
    s_kh,
    s_kt,
    s_kd,
    s_vb,
    s_vh,
    s_vt,
    s_vd,
    H,
    START,  # the query's position: keys 0 .. START are read
    Pos,  # with POS_IN_MEMORY, START is read from here instead (CUDA-graph replays)
    CHUNK,  # keys per split, a multiple of BLOCK_N
    SPLITS,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    POS_IN_MEMORY: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # b * batch stride passes 2**31 for big caches
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h * s_qh + offs_d * s_qd, mask=d_mask, other=0.0).to(tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if POS_IN_MEMORY:
        START = tl.load(Pos).to(tl.int32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, START + 1)  # a split past the last key does no work

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k = tl.load(
            k_base + offs_n[:, None] * s_kt + offs_d[None, :] * s_kd,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale_log2
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(
            v_base + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    row = pid_bh * SPLITS + split
    # An empty split (only with a grid sized for the whole cache) stores 0 with weight 0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(Part + row * BLOCK_D + offs_d, acc / l_safe)
    tl.store(Lse + row + tl.arange(0, 1), m_i + tl.log2(l_safe))  # -inf when empty


@triton.jit(do_not_specialize=["SPLITS", "LA"])
def decode_combine_kernel(
    Part,
    Lse,
    Q,
    KA,
    VA,
    G,
    Out,
    s_qb,
    s_qh,
    s_qd,
    s_kah,
    s_kaa,
    s_kad,
    s_vah,
    s_vaa,
    s_vad,
    s_ob,
    s_oh,
    s_od,
    H,
    SPLITS,
    LA,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_A: tl.constexpr,
    HAS_ADAPTER: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)  # b * batch stride passes 2**31 for big caches
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < SPLITS
    lse = tl.load(Lse + pid_bh * SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    part = tl.load(
        Part + (pid_bh * SPLITS + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(w[:, None] * part, 0)
    if HAS_ADAPTER:  # one query row: products and sums instead of tl.dot (which needs 16 rows)
        q = tl.load(Q + b * s_qb + h * s_qh + offs_d * s_qd, mask=d_mask, other=0.0)
        offs_a = tl.arange(0, BLOCK_A)
        a_mask = offs_a < LA
        ka = tl.load(
            KA + h * s_kah + offs_a[:, None] * s_kaa + offs_d[None, :] * s_kad,
            mask=a_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        sa = tl.sum(ka.to(tl.float32) * q.to(tl.float32)[None, :], 1) * scale_log2
        sa = tl.where(a_mask, sa, float("-inf"))
        pa = tl.exp2(sa - tl.max(sa, 0))
        pa = pa / tl.sum(pa, 0)
        va = tl.load(
            VA + h * s_vah + offs_a[:, None] * s_vaa + offs_d[None, :] * s_vad,
            mask=a_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        out += tl.load(G + h) * tl.sum(pa[:, None] * va.to(tl.float32), 0)
    tl.store(Out + b * s_ob + h * s_oh + offs_d * s_od, out.to(Out.dtype.element_ty), mask=d_mask)
