"""ws_max_age on an injected clock: each connection's limit within ±10 %, timers owned by the pair."""

from __future__ import annotations

import random

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_gateway.ageing import MAX_AGE, Ageing, age_limit


@pytest.mark.parametrize(
    ("max_age", "draw", "limit"),
    [(3600, 0.0, 3240.0), (3600, 0.5, 3600.0), (3600, 0.999999, 3960.0), (100, 0.25, 95.0)],
)
def test_age_limit_is_within_ten_percent(max_age, draw, limit):
    assert age_limit(max_age, draw) == pytest.approx(limit, abs=0.01)


class FakePair:
    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()
        self.closed: list[tuple[tuple[int, bytes], str]] = []

    def close_both(self, close: tuple[int, bytes], reason: str) -> None:
        self.closed.append((close, reason))
        self.done.callback(None)


def test_pairs_opened_together_are_closed_spread_over_the_jitter():
    clock = Clock()
    ageing = Ageing(clock, 3600, random.Random(7).random)
    pairs = [FakePair() for _ in range(1000)]
    for pair in pairs:
        ageing.watch(pair)
    clock.advance(3240 - 0.001)
    assert not any(p.closed for p in pairs)
    closed_per_minute = []
    for _ in range(12):
        before = sum(bool(p.closed) for p in pairs)
        clock.advance(60)
        closed_per_minute.append(sum(bool(p.closed) for p in pairs) - before)
    assert all(p.closed == [(MAX_AGE, "max_age")] for p in pairs)
    # uniform over 720 s: ~83 a minute, never the whole storm at once
    assert max(closed_per_minute) < 150
    assert not clock.getDelayedCalls()


def test_a_pair_that_ends_first_leaves_no_timer():
    clock = Clock()
    ageing = Ageing(clock, 60)
    pair = FakePair()
    ageing.watch(pair)
    pair.done.callback(None)
    assert not clock.getDelayedCalls()
    clock.advance(100)
    assert pair.closed == []


def test_zero_is_off():
    clock = Clock()
    Ageing(clock, 0).watch(FakePair())
    assert not clock.getDelayedCalls()
