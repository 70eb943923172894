"""What the CPU decode benchmark measures besides tokens/s: the memory's read bandwidth (for the
roofline), the CPU time other processes took meanwhile (the box may be shared), and where a
decode's CPU time goes (torch.profiler, by op and input shape)."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def measure_bandwidth(repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: median time of torch.sum over a 1 GiB fp32 tensor."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    x.sum()  # fault the pages in, warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


class OtherLoad:
    """CPU time that other processes used while we ran, in cores (the box may be shared)."""

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (_busy_s() - self.busy0) - (_own_s() - self.own0)) / wall


def _busy_s() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_steps(fn: Callable[[], Any], label: str, top: int = 12) -> tuple[str, dict[str, float]]:
    """Profile one call of ``fn``: a table by op and input shape, and where the CPU time went."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    share = {
        "wall_s": wall,
        "op_self_cpu_s": total,
        "matmul_s": sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6,
        "softmax_s": sum(e.self_cpu_time_total for e in events if "softmax" in e.key) / 1e6,
        "sdpa_s": sum(e.self_cpu_time_total for e in events if "scaled_dot" in e.key) / 1e6,
        "cat_s": sum(e.self_cpu_time_total for e in events if e.key == "aten::cat") / 1e6,
        "op_calls": sum(e.count for e in events),
    }
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=top,
        max_name_column_width=36,
        max_shapes_column_width=44,
    )
    summary = (
        f"op self CPU {total:.3f} s (wall {wall:.3f} s, {share['op_calls']} op calls): "
        f"matmuls {share['matmul_s'] / total:.0%}, softmax {share['softmax_s'] / total:.0%}, "
        f"sdpa {share['sdpa_s'] / total:.0%}, cat {share['cat_s'] / total:.0%}"
    )
    return f"### profile: {label}\n{summary}\n```\n{table}\n```", share
