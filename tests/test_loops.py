"""The loop detector against a brute-force reading of its definition (docs/generation.md).

Why the oracle and the run[p] formulation agree: run[p] after token n counts the consecutive i
ending at n with t_i == t_{i-p} (i >= p), so run[p] + p is the length of the longest p-periodic
suffix -- but only once n + 1 >= p: before that run[p] == 0 and run[p] + p == p overstates it.
"The last span tokens are p-periodic" means n + 1 >= span and t_i == t_{i-p} for the span - p
values of i in [n - span + p + 1, n], i.e. run[p] >= span - p. With min_repeats >= 2, span >= 2p,
so run[p] + p >= span needs run[p] >= p >= 1, hence n >= p, hence run[p] + p <= n + 1: the two
tests agree exactly. They differ only at min_repeats == 1 (span == p for p >= min_span): the
window test is then vacuous and fires at step min_span - 1, while run[p] + p >= p fires on the
very first token with a negative start. Both are nonsense, so the detector rejects min_repeats < 2.
Also, run[p] + p grows by exactly 1 per matching step, so at the declaration it equals the span:
start = step - span + 1 and repeats = span / period, always.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from ckpt_doctor.loops import Loop, LoopDetector, find_loop


def oracle(
    tokens: list[int], *, max_period: int = 256, min_span: int = 32, min_repeats: int = 3
) -> tuple[int, Loop] | None:
    """First prefix whose last max(min_span, min_repeats * p) tokens are p-periodic, smallest p."""
    for n in range(1, len(tokens) + 1):
        for p in range(1, max_period + 1):
            span = max(min_span, min_repeats * p)
            if span > n:
                break  # span never shrinks as p grows: no larger p fits either
            window = tokens[n - span : n]
            if window[p:] == window[:-p]:  # window[i] == window[i - p] for every i in [p, span)
                # Extend the periodic stretch backwards as far as it goes.
                s = n - span
                while s > 0 and s - 1 + p < n and tokens[s - 1] == tokens[s - 1 + p]:
                    s -= 1
                return n - 1, Loop(period=p, start=s, repeats=round((n - s) / p, 2))
    return None


def fundamental_period(pattern: list[int]) -> int:
    """Smallest q such that the infinite repetition of ``pattern`` is q-periodic."""
    p = len(pattern)
    doubled = pattern + pattern
    return next(q for q in range(1, p + 1) if all(doubled[i] == doubled[i + q] for i in range(p)))


def span_of(p: int, *, min_span: int = 32, min_repeats: int = 3) -> int:
    return max(min_span, min_repeats * p)


def random_tokens(rng: random.Random, n: int, vocab: int = 50) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def planted_cases(seed: int, count: int, vocab: int) -> list[tuple[list[int], int, int]]:
    """(stream, prefix length, fundamental period) for planted loops of many periods/offsets."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        p = rng.randint(1, 100)
        pattern = random_tokens(rng, p, vocab)
        q = fundamental_period(pattern)
        prefix_len = rng.randint(0, 200)
        prefix = random_tokens(rng, prefix_len, vocab)
        if prefix:
            # Keep the prefix from extending the loop backwards, so it starts at prefix_len.
            while prefix[-1] == pattern[q - 1]:
                prefix[-1] = rng.randrange(vocab)
        body = (pattern * (span_of(p) // p + 3))[: span_of(p) + rng.randint(0, 40)]
        cases.append((prefix + body, prefix_len, q))
    return cases


@pytest.mark.parametrize(("seed", "vocab"), [(0, 50), (1, 50), (2, 4), (3, 2)])
def test_planted_loops_match_oracle(seed: int, vocab: int) -> None:
    for stream, prefix_len, q in planted_cases(seed, 40, vocab):
        got = find_loop(stream)
        assert got == oracle(stream), (seed, prefix_len, q)
        if vocab >= 50:  # small vocabularies may loop inside the random prefix
            step, loop = got
            assert loop.period == q
            assert loop.start == prefix_len
            assert step == prefix_len + span_of(q) - 1
            assert loop.repeats == round(span_of(q) / q, 2)


def test_every_period_and_offset_is_exact() -> None:
    rng = random.Random(7)
    for p in range(1, 101):
        pattern = list(range(1000, 1000 + p))  # distinct tokens: fundamental period is p
        for prefix_len in (0, 1, p - 1, p, 37):
            prefix = random_tokens(rng, prefix_len, 50)  # disjoint from the pattern's tokens
            stream = prefix + pattern * (span_of(p) // p + 2)
            step, loop = find_loop(stream)
            assert (loop.period, loop.start) == (p, prefix_len)
            assert step == prefix_len + span_of(p) - 1


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_have_no_false_positive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 50 + 50 * seed, size=512).tolist()
    assert find_loop(stream) is None
    assert oracle(stream) is None


@pytest.mark.parametrize("seed", range(40))
def test_small_params_match_oracle_on_random_streams(seed: int) -> None:
    # Small spans and alphabets make loops (and near misses) common, so the two really compete.
    rng = random.Random(100 + seed)
    params = {
        "max_period": rng.randint(1, 12),
        "min_span": rng.randint(1, 10),
        "min_repeats": rng.randint(2, 4),
    }
    stream = random_tokens(rng, 200, rng.randint(2, 3))
    assert find_loop(stream, **params) == oracle(stream, **params), params


def test_all_same_declares_period_one_at_step_31() -> None:
    det = LoopDetector()
    results = [det.push(5) for _ in range(40)]
    assert results[:31] == [None] * 31
    assert results[31] == Loop(period=1, start=0, repeats=32.0)
    assert find_loop([5] * 40) == (31, Loop(period=1, start=0, repeats=32.0))


def test_period_11_needs_33_tokens() -> None:
    pattern = list(range(11))
    assert find_loop((pattern * 3)[:32]) is None
    assert find_loop(pattern * 3) == (32, Loop(period=11, start=0, repeats=3.0))
    assert find_loop(pattern * 2 + pattern[:10]) is None  # 32 tokens, only 2.9 periods


def test_period_10_needs_32_tokens() -> None:
    pattern = list(range(10))
    assert find_loop(pattern * 4) == (31, Loop(period=10, start=0, repeats=3.2))


def test_period_256_needs_768_tokens() -> None:
    stream = list(range(256)) * 3
    assert find_loop(stream[:-1]) is None
    assert find_loop(stream) == (767, Loop(period=256, start=0, repeats=3.0))


def test_period_257_is_beyond_default_max_period() -> None:
    stream = list(range(257)) * 5
    assert find_loop(stream) is None
    assert find_loop(stream, max_period=257) == (770, Loop(period=257, start=0, repeats=3.0))


def test_parameters_are_respected() -> None:
    assert find_loop([1] * 10, min_span=8) == (7, Loop(period=1, start=0, repeats=8.0))
    period_20 = list(range(20)) * 3
    assert find_loop(period_20, min_repeats=2) == (39, Loop(period=20, start=0, repeats=2.0))
    assert find_loop(period_20, max_period=19) is None
    assert find_loop(list(range(5)) * 20, max_period=4) is None


@pytest.mark.parametrize(
    "kwargs", [{"max_period": 0}, {"min_span": 0}, {"min_repeats": 1}, {"min_repeats": -1}]
)
def test_bad_parameters_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        LoopDetector(**kwargs)


def test_sticky_and_n_tokens() -> None:
    det = LoopDetector(min_span=4)
    assert det.loop is None and det.n_tokens == 0
    for t in [9, 1, 2, 1, 2]:
        assert det.push(t) is None
    assert det.push(1) is None  # period 2 needs max(4, 3 * 2) = 6 tokens, not 5
    assert det.push(2) == Loop(period=2, start=1, repeats=3.0)
    first = det.loop
    for t in [7, 8, 9, 9, 9, 9, 9, 9]:  # a different loop later changes nothing
        assert det.push(t) is first
    assert det.loop is first
    assert det.n_tokens == 15


def test_to_json() -> None:
    loop = Loop(period=3, start=4, repeats=10.67)
    assert loop.to_json() == {"period": 3, "start": 4, "repeats": 10.67}


def test_batch_of_512_random_tokens_has_no_loop() -> None:
    # (No timing assertion: the suite must not depend on how loaded the machine is.)
    rng = np.random.default_rng(0)
    streams = rng.integers(0, 32000, size=(8, 512))
    dets = [LoopDetector() for _ in range(8)]
    for col in range(512):
        for det, stream in zip(dets, streams, strict=True):
            det.push(int(stream[col]))
    assert all(det.loop is None for det in dets)
