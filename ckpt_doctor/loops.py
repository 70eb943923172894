"""Online loop detector over generated tokens (docs/generation.md).

After token t_n arrives, run[p] counts the consecutive steps ending at n with t_i == t_{i-p}
(a missing t_{i-p} is no match), so run[p] + p is the length of the longest p-periodic suffix.
A loop is declared at the smallest p with run[p] + p >= max(min_span, min_repeats * p), i.e.
when the last max(min_span, min_repeats * p) tokens are exactly p-periodic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Loop:
    """A declared loop: its period, where its periodic stretch starts, how many periods it spans."""

    period: int
    start: int  # 0-based index into the generated tokens
    repeats: float

    def to_json(self) -> dict[str, float | int]:
        return {"period": self.period, "start": self.start, "repeats": self.repeats}


class LoopDetector:
    """Feed generated tokens one at a time; O(max_period) numpy work per token."""

    def __init__(self, *, max_period: int = 256, min_span: int = 32, min_repeats: int = 3) -> None:
        # A loop needs two periods at least. With min_repeats == 1 the window test is vacuous
        # (any p tokens are "p-periodic") and run[p] + p >= p holds on the very first token.
        if max_period < 1 or min_span < 1 or min_repeats < 2:
            raise ValueError(
                "need max_period >= 1, min_span >= 1 and min_repeats >= 2, got "
                f"{max_period}, {min_span}, {min_repeats}"
            )
        periods = np.arange(1, max_period + 1, dtype=np.int64)
        # run[p] + p >= span  <=>  run[p] >= span - p; precomputed once.
        self._need = np.maximum(min_span, min_repeats * periods) - periods
        # History as a shift register: recent[p - 1] == t_{n-p}, only slots < n are filled.
        self._recent = np.zeros(max_period, dtype=np.int64)
        self._run = np.zeros(max_period, dtype=np.int64)
        self._n = 0
        self._loop: Loop | None = None

    @property
    def loop(self) -> Loop | None:
        return self._loop

    @property
    def n_tokens(self) -> int:
        return self._n

    def push(self, token: int) -> Loop | None:
        """Feed one token; return the Loop once declared (and on every later push), else None."""
        n = self._n
        self._n += 1
        if self._loop is not None:  # sticky: generation stops at the first declaration
            return self._loop
        match = self._recent == token
        if n < len(match):
            match[n:] = False  # t_{n-p} does not exist for p > n: no match
        # run = where(match, run + 1, 0), in place: a few numpy calls per token in all.
        run = self._run
        np.add(run, 1, out=run)
        np.multiply(run, match, out=run)
        self._recent[1:] = self._recent[:-1]  # numpy copies overlapping slices safely
        self._recent[0] = token
        hits = np.flatnonzero(run >= self._need)
        if hits.size:
            period = int(hits[0]) + 1  # smallest period wins
            length = int(run[period - 1]) + period  # the longest p-periodic suffix
            self._loop = Loop(period, n - length + 1, round(length / period, 2))
        return self._loop


def find_loop(
    tokens: Sequence[int], *, max_period: int = 256, min_span: int = 32, min_repeats: int = 3
) -> tuple[int, Loop] | None:
    """Run a fresh detector over ``tokens``; (0-based step it was declared at, Loop) or None."""
    detector = LoopDetector(max_period=max_period, min_span=min_span, min_repeats=min_repeats)
    for step, token in enumerate(tokens):
        loop = detector.push(int(token))
        if loop is not None:
            return step, loop
    return None
