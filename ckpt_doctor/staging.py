"""Weights from the file map to the GPU: large chunks through pinned staging buffers, on a copy
stream, so that reading the next chunk from the page cache overlaps the transfer of the last.

A weight is read once, from the file's memory map into one of two pinned buffers (the only
host copy, and a bounded one: ``2 x chunk_bytes``), and crosses the bus in the file's dtype;
casts to the model's dtype run on the device. The main stream waits for the copy stream once,
at ``finish()``. On the CPU nothing moves (loading.py never makes a copier there); the same
chunk logic runs with unpinned buffers and no stream, which is how the CPU tests check it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

CHUNK_BYTES = 64 << 20  # large enough to run near the bus's speed, small enough to overlap


class DeviceCopier:
    def __init__(self, device: torch.device, *, chunk_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.chunk = chunk_bytes or CHUNK_BYTES
        self.buffers = [
            torch.empty(self.chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)
        ]
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def to_device(self, t: torch.Tensor, casts: list[torch.dtype]) -> torch.Tensor:
        """``t`` (a CPU tensor, typically a view of the file map) on the device, cast through
        ``casts`` in order. The result is ready on the copy stream; finish() hands it over."""
        src = t.contiguous().reshape(-1)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with ctx:
            out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            src_bytes, out_bytes = _bytes(src), _bytes(out.reshape(-1))
            for lo in range(0, src_bytes.numel(), self.chunk):
                hi = min(lo + self.chunk, src_bytes.numel())
                k = self.turn
                self.turn ^= 1
                if self.done[k] is not None:  # the transfer still reading this buffer
                    self.done[k].synchronize()
                stage = self.buffers[k][: hi - lo]
                stage.copy_(src_bytes[lo:hi])  # the read from the page cache (host memcpy)
                out_bytes[lo:hi].copy_(stage, non_blocking=True)
                if self.stream is not None:
                    self.done[k] = torch.cuda.Event()
                    self.done[k].record(self.stream)
            for cast in casts:
                out = out.to(cast)
        return out

    def finish(self) -> None:
        """Make the current stream wait for every copy and cast issued so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat contiguous tensor's bytes as uint8 (any dtype, bool and 0-d included)."""
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t
