"""The fused-attention launcher's own per-call Python work, before and after the plan cache.

kernels/launch.py used to build its launch plan on every call (strides, split layout, grids,
argument tuples, Launch objects); now ``cached_plan`` builds it once per shape and fills in each
call's tensors and position. This measures what the launcher costs per call with the Triton
launches replaced by no-ops, so that only ckpt-doctor's own Python work is timed (Triton's
launch and the kernels are the same either way), on the CPU, both sides in the same run,
alternating, median of repeats:

- before: ``plan()`` each call, then each Launch launched (the old ``gated_attention`` body);
- after: ``gated_attention(..., check=False)`` as the model calls it (``cached_plan``).

Shapes: 7B's 32 heads x 128, adapter_len 10; decode at an int position (eager steps) and at
a position held in a tensor (what a CUDA graph captures), prefill T=512.

    python benchmarks/launch_overhead.py [--calls 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from common import load_average, machine_description, markdown_table


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **meta: None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from ckpt_doctor.kernels import launch
    from ckpt_doctor.kernels import triton_attention as ta

    for name in ("gated_prefill_kernel", "decode_partial_kernel", "decode_combine_kernel"):
        setattr(ta, name, _NoLaunch())

    def before(q, k, v, start, adapter):  # the launcher as it was: a new plan every call
        out = torch.empty_like(q)
        for p in launch.plan(q, k, v, out, start=start, adapter=adapter):
            p.kernel[p.grid](*p.args, **p.constexprs)
        return out

    def after(q, k, v, start, adapter):
        ak, av, g = adapter
        return launch.gated_attention(
            q, k, v, start=start, adapter_k=ak, adapter_v=av, gate=g, check=False
        )

    h, hd, la, length = 32, 128, 10, 2048
    adapter = (torch.randn(h, la, hd), torch.randn(h, la, hd), torch.rand(h))
    cases = []
    for b in (1, 8):
        cache = torch.randn(b, h, length, hd)
        q = torch.randn(b, h, 1, hd)
        cases.append((f"decode B={b} L={length}, int position", q, cache, length - 1))
        cases.append(
            (f"decode B={b} L={length}, position in a tensor", q, cache, torch.tensor([length - 1]))
        )
    prefill = torch.randn(1, h, 512, hd)
    cases.append(("prefill B=1 T=512", prefill, torch.randn(1, h, 512, hd), 0))

    rows, result = [], []
    for label, q, cache, start in cases:
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for side, fn in (("before", before), ("after", after)):
                fn(q, cache, cache, start, adapter)  # warm (the cache fills on the first call)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn(q, cache, cache, start, adapter)
                times[side].append((time.perf_counter() - t0) / args.calls)
        b_us, a_us = (statistics.median(times[s]) * 1e6 for s in ("before", "after"))
        rows.append([label, f"{b_us:.1f}", f"{a_us:.1f}", f"{a_us / b_us:.2f}x"])
        result.append({"case": label, "before_us": b_us, "after_us": a_us})
    print(f"Machine: {machine_description()}; load average {load_average()}")
    print(f"{args.calls} calls x {args.repeats} repeats, median per call, Triton launches stubbed")
    print()
    headers = ["call", "before: plan every call (us)", "after: cached plan (us)", "after/before"]
    print(markdown_table(rows, headers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
