"""Where the time to a verdict goes: import, read, host->device, build, compile/capture,
prefill, decode (and diagnose's static checks).

The library marks its steps with ``phase(name)``; that costs nothing unless a ``Recorder`` is
active (``recording()``: the CLI starts one per smoke-generate / diagnose run). Phases never
overlap: entering a phase pauses the one around it, so the phases add up to the time spent
inside them and nothing is counted twice. On CUDA a phase ends with a device synchronize, so
that asynchronous kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

PHASES = (
    "import",  # interpreter start to the command's first step (the CLI only)
    "read",  # opening files, making tensors from the file map (casts on the CPU included)
    "host_to_device",  # copies to the GPU (0 on the CPU: nothing moves)
    "build",  # the model around the weights, the adapter's K/V, the CPU weight layout
    "compile_capture",  # Triton compiles and the CUDA-graph capture of the decode step
    "checks",  # diagnose's static findings against the base
    "prefill",
    "decode",
)


class Recorder:
    """Seconds per phase, exclusive of the phases nested inside."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._stack: list[tuple[str, float]] = []
        self.started = time.perf_counter()
        self.sync: Any = None  # set to torch.cuda.synchronize while a CUDA model runs

    def pause(self) -> None:
        """Stop the running phase's clock (a nested recorder takes over)."""
        if self._stack:
            name, since = self._stack[-1]
            self.seconds[name] += self._now() - since

    def resume(self, child: Recorder) -> None:
        """Take a nested recorder's phases, and restart the running phase's clock."""
        for name, value in child.seconds.items():
            if name != "import":
                self.seconds[name] = self.seconds.get(name, 0.0) + value
        if self._stack:
            self._stack[-1] = (self._stack[-1][0], self._now())

    def enter(self, name: str, *, sync: bool = True) -> None:
        now = self._now(sync)
        if self._stack:  # pause the enclosing phase
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((name, now))

    def leave(self, *, sync: bool = True) -> None:
        now = self._now(sync)
        name, since = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        if self._stack:  # the enclosing phase runs again from now
            self._stack[-1] = (self._stack[-1][0], now)

    def _now(self, sync: bool = True) -> float:
        if sync and self.sync is not None:
            self.sync()
        return time.perf_counter()

    def to_json(self) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 4)
        return out


_ACTIVE: ContextVar[Recorder | None] = ContextVar("ckpt_doctor_timings", default=None)


def active() -> Recorder | None:
    return _ACTIVE.get()


@contextmanager
def recording(*, since_process_start: bool = False) -> Iterator[Recorder]:
    """Record the phases run inside. ``since_process_start``: charge the time from the
    interpreter's start to now to ``import`` (what a fresh CLI process pays before work)."""
    parent = _ACTIVE.get()
    rec = Recorder()
    if since_process_start:
        rec.seconds["import"] = process_age()
    if parent is not None:  # nested (diagnose's arms): the parent gets the phases as well
        parent.pause()
        rec.sync = parent.sync
    token = _ACTIVE.set(rec)
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)
        if parent is not None:
            parent.resume(rec)


@contextmanager
def phase(name: str, *, sync: bool = True) -> Iterator[None]:
    """Charge the time inside to ``name``. ``sync=False``: no device synchronize at its edges
    (the per-tensor steps of a load, whose copies overlap on a stream of their own: a
    synchronize there would serialise them; what is still in flight goes to the next phase)."""
    rec = _ACTIVE.get()
    if rec is None:
        yield
        return
    rec.enter(name, sync=sync)
    try:
        yield
    finally:
        rec.leave(sync=sync)


@contextmanager
def device_sync(device: Any) -> Iterator[None]:
    """Synchronize ``device`` at every phase boundary inside (CUDA only)."""
    rec = _ACTIVE.get()
    if rec is None or getattr(device, "type", None) != "cuda":
        yield
        return
    import torch

    before = rec.sync
    rec.sync = lambda: torch.cuda.synchronize(device)
    try:
        yield
    finally:
        rec.sync = before


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def text(timings: dict[str, Any]) -> str:
    """One line for --debug: every phase that took time, then the total."""
    parts = [f"{k.replace('_', ' ')} {v:.2f} s" for k, v in timings.items() if k in PHASES and v]
    return f"timings: {', '.join(parts)}; total {timings.get('total', 0.0):.2f} s"
