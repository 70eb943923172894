"""Compile every kernel ahead of time for real GPUs, with no GPU present.

The CPU interpreter checks the math but not what only a GPU compiler rejects (layouts, shared
memory, dot shapes, register pressure); ``triton.compile`` with an explicit target runs the whole
pipeline down to a cubin. Run without TRITON_INTERPRET:

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

DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
# Largest dynamic shared memory one block may use (A100: 163 KiB; H100/H200: 227 KiB).
SHARED_LIMIT = {80: 166912, 90: 232448}


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


def _signature(fn: Any, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every argument of ``fn``: pointers and floats from ``types``, the rest i32 or constexpr;
    a constexpr left without a value is an error here rather than a wrong compile."""
    out = {}
    for name, param in zip(fn.arg_names, fn.params, strict=True):
        if param.is_constexpr and name not in constexprs:
            raise ValueError(f"{fn.__name__}: no value for constexpr {name}")
        out[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return out


Job = tuple[Any, dict[str, str], dict[str, Any], str, dict[str, int], str]


def _jobs(head_dim: int) -> list[Job]:
    """(kernel, pointer/float types, constexprs, config label, compile options, dtype)."""
    from ckpt_doctor.kernels import triton_attention as ta
    from ckpt_doctor.kernels.launch import DECODE_BLOCK_N, _pow2

    block_d = _pow2(head_dim)
    jobs = []
    for dtype, ptr in DTYPES.items():
        precision = "ieee" if dtype == "fp32" else "tf32"  # tf32: ignored for 16-bit inputs
        tensor = {n: ptr for n in ("Q", "K", "V", "KA", "VA", "Out")}
        f32 = {"G": "*fp32", "Part": "*fp32", "Lse": "*fp32", "scale_log2": "fp32"}
        for cfg in ta.prune_configs(ta.PREFILL_CONFIGS, {}, PRECISION=precision):
            const = {
                "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_A": 16, "HAS_ADAPTER": True,
                "PRECISION": precision, **cfg.kwargs,
            }  # fmt: skip
            label = f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps}"
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            jobs.append((ta.gated_prefill_kernel.fn, {**tensor, **f32}, const, label, opts, dtype))
        for in_memory in (False, True):  # the position as an int, or read from memory
            const = {
                "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_N": DECODE_BLOCK_N,
                "POS_IN_MEMORY": in_memory,
            }  # fmt: skip
            types = {**tensor, **f32, "Pos": "*i64" if in_memory else ptr}
            label = "split-KV, pos " + ("in memory" if in_memory else "int")
            jobs.append((ta.decode_partial_kernel, types, const, label, {}, dtype))
        const = {
            "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_S": 32, "BLOCK_A": 16,
            "HAS_ADAPTER": True,
        }  # fmt: skip
        jobs.append((ta.decode_combine_kernel, {**tensor, **f32}, const, "combine", {}, dtype))
    return jobs


def compile_one(arch: int, index: int, head_dim: int) -> Compiled:
    """Compile job ``index`` of _jobs(head_dim) for one compute capability."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, types, const, label, opts, dtype = _jobs(head_dim)[index]
    src = ASTSource(fn=fn, signature=_signature(fn, types, const), constexprs=const)
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
