"""The fused residual + RMSNorm, SwiGLU and RoPE + KV-cache-write kernels (kernels/fused.py)
against their PyTorch references, in Triton's interpreter (fp32, fp16) or compiled on CUDA with
CKPT_DOCTOR_GPU_TESTS=1 (bf16 added). The criterion is test_kernels.py's: against an fp64
oracle, the kernel's max error is at most 2x that of the reference in the same precision."""

from __future__ import annotations

import pytest
import torch
from ckpt_doctor.kernels.fused import add_rmsnorm, rope_and_cache, swiglu
from ckpt_doctor.kernels.reference import (
    add_rmsnorm_reference,
    rope_and_cache_reference,
    swiglu_reference,
)

from ckpt_doctor.model import rope_table
from tests.kernel_marks import DEVICE, DTYPE_IDS, DTYPES, MARKS

pytest.importorskip("triton", reason="pip install 'ckpt-doctor[triton]'")
pytestmark = MARKS
SHAPES = [(2, 5, 64), (1, 1, 100), (3, 48)]  # width 100 and 48: not a block multiple


def rnd(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def worst(got: torch.Tensor, oracle: torch.Tensor) -> float:
    return (got.double() - oracle).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("weight", ["model dtype", "fp32"])  # v2 keeps trained norms in fp32
@pytest.mark.parametrize("delta", [True, False], ids=["residual", "first layer"])
def test_add_rmsnorm_matches_the_reference(dtype, shape, weight, delta):
    h64, d64 = rnd(*shape, seed=1, scale=3), rnd(*shape, seed=2)
    w64 = 1 + rnd(shape[-1], seed=3, scale=0.1)
    w = w64.float() if weight == "fp32" else w64.to(dtype)
    h, d = h64.to(dtype), d64.to(dtype) if delta else None
    # The oracle sees the inputs as rounded: only the computation's error is compared.
    _, oracle_y = add_rmsnorm_reference(h.double(), d.double() if delta else None, w.double(), 1e-5)
    ref_h, ref_y = add_rmsnorm_reference(h, d, w, 1e-5)
    got_h, got_y = add_rmsnorm(h, d, w, 1e-5)
    assert got_y.dtype == dtype and got_y.shape == h.shape
    assert torch.equal(got_h, ref_h)  # one correctly rounded add either way
    if delta:
        assert got_h.data_ptr() != h.data_ptr()  # the caller's stream is not overwritten
    assert worst(got_y, oracle_y) <= 2 * worst(ref_y, oracle_y) + 1e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 192), (1, 1, 2500)], ids=["192", "2500"])
def test_swiglu_matches_the_reference(dtype, shape):
    gate, up = rnd(*shape, seed=4, scale=3).to(dtype), rnd(*shape, seed=5).to(dtype)
    oracle = swiglu_reference(gate.double(), up.double())
    got, ref = swiglu(gate, up), swiglu_reference(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape
    assert worst(got, oracle) <= 2 * worst(ref, oracle) + 1e-7


def test_what_does_not_fit_goes_to_the_reference():
    """A strided last dim, mixed dtypes: the reference's answer, not garbage."""
    h = rnd(4, 64, seed=6).float()
    strided = h.t().contiguous().t()  # last dim stride 4
    w = torch.ones(64, device=DEVICE)
    for got, want in [
        (add_rmsnorm(strided, None, w, 1e-5), add_rmsnorm_reference(strided, None, w, 1e-5)),
        (add_rmsnorm(h, h.half(), w, 1e-5), add_rmsnorm_reference(h, h.half(), w, 1e-5)),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(swiglu(strided, strided), swiglu_reference(strided, strided))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("b", "t", "start", "in_memory"),
    [(2, 7, 0, False), (2, 5, 11, False), (2, 1, 40, False), (3, 1, 40, True)],
    ids=["prefill", "prefill-after-11", "decode", "decode-position-in-memory"],
)
def test_rope_and_cache_write_match_the_reference(dtype, b, t, start, in_memory):
    """q/k/v as the model makes them (views of one fused projection), caches poisoned with NaN
    everywhere else: RoPE(q) within 2x the reference's error, the cache rows written alike,
    every other cache position untouched."""
    h, hd, length = 3, 16, 64
    qkv = rnd(b, t, 3 * h * hd, seed=7, scale=2).to(dtype)
    q, k, v = (x.view(b, t, h, hd) for x in qkv.split(h * hd, dim=-1))
    rope_all = rope_table(hd, 2 * length, 10000.0).to(DEVICE)
    cos_sin = torch.view_as_real(rope_all).permute(2, 0, 1).contiguous()
    rope = rope_all[start : start + t]
    pos = torch.tensor([start], device=DEVICE) if in_memory else start
    caches = {}
    for side, fn, dt in [("ref", rope_and_cache_reference, dtype), ("fused", rope_and_cache, dtype),
                         ("oracle", rope_and_cache_reference, torch.float64)]:  # fmt: skip
        ck = torch.full((b + 1, h, length, hd), float("nan"), dtype=dt, device=DEVICE)
        cv = ck.clone()
        args = (q.to(dt), k.to(dt), v.to(dt))
        out = fn(*args, start=pos, rope=rope, cos_sin=cos_sin, cache_k=ck, cache_v=cv)
        caches[side] = (out, ck, cv)
    (ref_q, ref_k, ref_v), (got_q, got_k, got_v), (orc_q, orc_k, _) = caches.values()
    assert got_q.shape == (b, h, t, hd) and got_q.dtype == dtype
    rows = slice(start, start + t)
    assert worst(got_q, orc_q) <= 2 * worst(ref_q, orc_q) + 1e-7
    assert worst(got_k[:b, :, rows], orc_k[:b, :, rows]) <= (
        2 * worst(ref_k[:b, :, rows], orc_k[:b, :, rows]) + 1e-7
    )
    assert torch.equal(got_v[:b, :, rows], ref_v[:b, :, rows])  # v is copied as it is
    written = torch.zeros(b + 1, h, length, hd, dtype=torch.bool, device=DEVICE)
    written[:b, :, rows] = True
    for cache in (got_k, got_v):
        assert cache[written].isfinite().all() and cache[~written].isnan().all()
