"""How the library reports the progress of slow steps; render.py draws it, the library never.

A step calls ``progress(task, done, total, unit)`` as it goes: ``task`` names what runs now
("loading weights", "generating 4 prompts (1 finished)"), ``done`` of ``total`` counts ``unit``
("bytes", "tokens", "steps"); ``total`` is None when unknown. Every function that takes a
``progress`` keyword accepts None (no reporting), so callers without a terminal pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, "int | None", str], None]
# diffing's byte callback: progress(done_bytes, total_bytes, current tensor name).
ByteProgress = Callable[[int, int, str], None]


def prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    """The same callback with ``prefix`` before every task name (diagnose's arms, verify)."""
    if progress is None:
        return None

    def report(task: str, done: int, total: int | None, unit: str) -> None:
        progress(f"{prefix}{task}", done, total, unit)

    return report


def as_bytes(progress: Progress | None, task: str) -> ByteProgress | None:
    """A diffing-style byte callback that reports as ``task`` (the tensor name after it)."""
    if progress is None:
        return None

    def report(done: int, total: int, name: str) -> None:
        progress(f"{task} {name}".rstrip(), done, total, "bytes")

    return report
