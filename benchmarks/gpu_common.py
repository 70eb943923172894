"""What the GPU benchmarks share: the card's HBM peak, timing (eager and inside CUDA graphs),
the shapes (7B, and the toy ones of --dry-run), tables."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from common import markdown_table

# HBM peak by card name (vendor datasheets, bytes/s); unknown cards fall back to a measured copy.
# First match wins, so the PCIe/NVL variants come before plain "H100" (the SXM part).
HBM_PEAK = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
}

SHAPES_7B = {
    "h": 32, "hd": 128, "la": 10, "t": 512, "l": 2048,
    "prefill_t": [512, 2048, 4096], "decode_b": [1, 8, 32], "decode_l": [512, 2048, 8192],
    "dim": 4096, "n_layers": 32, "ffn": 11008, "vocab": 32000, "adapter_layer": 30, "prompt": 32,
    "batches": [1, 8, 32],
}  # fmt: skip
SHAPES_DRY = {
    "h": 2, "hd": 32, "la": 10, "t": 24, "l": 70,
    "prefill_t": [24], "decode_b": [2], "decode_l": [70],
    "dim": 64, "n_layers": 2, "ffn": 128, "vocab": 100, "adapter_layer": 1, "prompt": 5,
    "batches": [1, 2],
}  # fmt: skip


def hbm_peak(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return measured_copy_bandwidth(device), "measured copy (CPU dry run)"
    name = torch.cuda.get_device_name(device)
    for key, peak in HBM_PEAK.items():
        if key in name:
            return peak, f"{name} datasheet"
    return measured_copy_bandwidth(device), f"{name}: measured copy (not in the table)"


def measured_copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(256 * 2**20 // 4 if device.type == "cuda" else 2**22, device=device)
    y = torch.empty_like(x)
    seconds = bench(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / seconds


def bench(fn: Any, device: torch.device) -> float:
    """Median seconds per eager call (host overhead included: what a Python loop pays)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return _cpu_median(fn)


def bench_graph(fn: Any, device: torch.device) -> float:
    """Median seconds per call replayed inside a CUDA graph: the kernels without host noise
    (triton.testing.do_bench_cudagraph). The CPU dry run times the eager call instead."""
    if device.type == "cuda":
        import triton.testing

        # Captures as many calls as fill ``rep`` ms in one graph, on a side stream of its own.
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    return _cpu_median(fn)


def _cpu_median(fn: Any) -> float:
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    """common.markdown_table over dict rows, floats to 3 significant digits (errors are ~1e-3)."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else v)  # noqa: E731
    return markdown_table([[fmt(r.get(k)) for k in keys] for r in rows], keys)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (TRITON_INTERPRET=1 dry run)"


def failed(err: BaseException) -> str:
    """A step's exception as a result (one GPU path failing must not hide the others)."""
    return f"{type(err).__name__}: {err}"[:300]
