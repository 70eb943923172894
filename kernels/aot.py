"""Compile every kernel ahead of time for real GPUs, with no GPU present.

The CPU interpreter checks the math but not what only a GPU compiler rejects (layouts, shared
memory, dot shapes, register pressure); ``triton.compile`` with an explicit target runs the whole
pipeline down to a cubin. The launches come from launch.plan on meta tensors and are specialised
as the JIT specialises real ones, so the shared memory and the code checked here are what runs
(a plain all-i32 signature compiles a slower variant with other limits). Run without
TRITON_INTERPRET:

    python -m ckpt_doctor.kernels.aot            # sm_80 and sm_90a, fp16/bf16/fp32, head_dim 128
    python -m ckpt_doctor.kernels.aot --arch 90 --head-dim 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Largest dynamic shared memory one block may use (A100: 163 KiB; A10/L4/L40S and the
# RTX 30/40 series: 99 KiB; H100/H200: 227 KiB).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: int
    dtype: str
    config: str
    seconds: float
    shared_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT.get(self.arch, 0)


POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
           torch.int64: "*i64"}  # fmt: skip


def specialise(fn: Any, args: tuple, constexprs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) as Triton's JIT specialises a launch with these
    values: pointers 16-byte aligned (torch allocations are), an int equal to 1 a constant and
    one divisible by 16 marked so, except the parameters marked do_not_specialize. A constexpr
    left without a value is an error here rather than a wrong compile."""
    signature, const, attrs = {}, dict(constexprs), {}
    values = iter(args)
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            if name not in const:
                raise ValueError(f"{fn.__name__}: no value for constexpr {name}")
            signature[name] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name], const[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, const, attrs


# (kernel, argument values, constexprs, config label, compile options, dtype)
Job = tuple[Any, tuple, dict[str, Any], str, dict[str, int], str]


def _jobs(head_dim: int) -> list[Job]:
    """Every launch of kernels/launch.py's plan at 7B shapes (32 heads, adapter_len 10; prefill
    T=2048, decode over a 4096-position cache with the position as an int and in memory), on
    meta tensors, for each dtype and each prefill config the autotuner may pick."""
    from ckpt_doctor.kernels import triton_attention as ta
    from ckpt_doctor.kernels.launch import plan

    jobs = []
    for dtype, torch_dtype in DTYPES.items():
        with torch.device("meta"):
            q = torch.empty(1, 32, 2048, head_dim, dtype=torch_dtype)
            cache = torch.empty(1, 32, 4096, head_dim, dtype=torch_dtype)
            adapter = (torch.empty(32, 10, head_dim, dtype=torch_dtype),) * 2
            adapter += (torch.empty(32),)
            one = torch.empty(1, 32, 1, head_dim, dtype=torch_dtype)
            position = torch.empty(1, dtype=torch.int64)
        (prefill,) = plan(q, q, q, q, start=0, adapter=adapter)
        autotuner = prefill.kernel
        precision = prefill.constexprs["PRECISION"]
        for cfg in ta.prune_configs(autotuner.configs, {}, PRECISION=precision):
            label = f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps}"
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            const = {**prefill.constexprs, **cfg.kwargs}
            jobs.append((autotuner.fn, prefill.args, const, label, opts, dtype))
        for start, where in ((4000, "int"), (position, "in memory")):
            partial, combine = plan(one, cache, cache, one, start=start, adapter=adapter)
            label = f"split-KV, pos {where}"
            jobs.append((partial.kernel, partial.args, partial.constexprs, label, {}, dtype))
        jobs.append((combine.kernel, combine.args, combine.constexprs, "combine", {}, dtype))
        jobs += _fused_jobs(torch_dtype, dtype, head_dim)
    return jobs


def _fused_jobs(torch_dtype: torch.dtype, dtype: str, head_dim: int) -> list[Job]:
    """kernels/fused.py's launches at 7B shapes: the residual + RMSNorm (dim 4096, fp32 norm
    weight as v2 keeps it), SwiGLU (FFN 11008), RoPE + cache write at a position in a tensor."""
    from ckpt_doctor.kernels import fused

    with torch.device("meta"):
        h = torch.empty(1, 4096, dtype=torch_dtype)
        norm = torch.empty(4096)
        ffn = torch.empty(1, 11008, dtype=torch_dtype)
        q = torch.empty(1, 1, 32, head_dim, dtype=torch_dtype)
        cache = torch.empty(1, 32, 4096, head_dim, dtype=torch_dtype)
        cos_sin = torch.empty(2, 8192, head_dim // 2)
        out = torch.empty(1, 32, 1, head_dim, dtype=torch_dtype)
        position = torch.empty(1, dtype=torch.int64)
    launches = [
        ("residual + norm", fused.add_rmsnorm_launch(h, h, norm, h, h, 1e-5, has_delta=True)),
        ("SwiGLU", fused.swiglu_launch(ffn, ffn, ffn)),
        ("RoPE + cache", fused.rope_cache_launch(q, q, q, cos_sin, out, cache, cache, position)),
    ]
    jobs = []
    for label, (kernel, _, args, meta) in launches:
        opts = {k: meta.pop(k) for k in ("num_warps",) if k in meta}
        jobs.append((kernel, args, meta, label, opts, dtype))
    return jobs


def compile_one(arch: int, index: int, head_dim: int) -> Compiled:
    """Compile job ``index`` of _jobs(head_dim) for one compute capability."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, const, label, opts, dtype = _jobs(head_dim)[index]
    signature, constexprs, attrs = specialise(fn, args, const)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    seconds = time.perf_counter() - t0
    return Compiled(fn.__name__, arch, dtype, label, seconds, int(kernel.metadata.shared))


def compile_all(archs: list[int], *, head_dim: int = 128, workers: int = 0) -> list[Compiled]:
    """Compile every kernel and prefill config for each compute capability (80, 90, ...),
    in ``workers`` processes (0: one per CPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    tasks = [(arch, i, head_dim) for arch in archs for i in range(len(_jobs(head_dim)))]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_one, *zip(*tasks, strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per CPU)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.arch) - set(SHARED_LIMIT))
    if unknown:
        ap.error(f"no shared-memory limit known for sm_{unknown[0]}: use {sorted(SHARED_LIMIT)}")
    results = compile_all(args.arch, head_dim=args.head_dim, workers=args.workers)
    for r in results:
        print(
            f"{r.kernel:24s} sm_{r.arch}{'a' * (r.arch >= 90):1s} {r.dtype:5s} {r.config:14s} "
            f"shared {r.shared_bytes:6d} B {'fits' if r.fits else 'TOO BIG'}  {r.seconds:5.1f} s"
        )
    too_big = [r for r in results if not r.fits]
    print(f"{len(results)} kernels compiled, {len(too_big)} over the shared-memory limit",
          file=sys.stderr)  # fmt: skip
    return 1 if too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())
