"""The token bucket behind ws_rate_limit: pure arithmetic on a given clock."""

from __future__ import annotations

import pytest

from twisted_gateway.rate_limit import TokenBucket, burst_for


@pytest.mark.parametrize(
    "rate, burst, times, allowed",
    [
        # a new bucket is full: the burst passes at once, the next message does not
        (20, 40, [0.0] * 41, [True] * 40 + [False]),
        # one message a second after the burst is spent
        (1, 2, [0, 0, 0, 0.5, 1.0, 1.0], [True, True, False, False, True, False]),
        # idle time refills up to the burst, not beyond
        (10, 3, [0, 0, 0, 100, 100, 100, 100], [True, True, True, True, True, True, False]),
        # a steady sender at the rate is never refused
        (5, 2, [i / 5 for i in range(20)], [True] * 20),
        # a clock that goes backwards refills nothing
        (1, 1, [10, 5, 10.5, 11], [True, False, False, True]),
    ],
)
def test_token_bucket_allows_the_rate_and_the_burst(rate, burst, times, allowed):
    bucket = TokenBucket.full(rate, burst, times[0])
    assert [bucket.take(t) for t in times] == allowed


def test_refused_messages_take_nothing_from_the_bucket():
    """A client refused once is not punished further for the refusal itself."""
    bucket = TokenBucket.full(2, 1, 0)
    assert bucket.take(0)
    assert not bucket.take(0.1)
    assert not bucket.take(0.2)
    assert bucket.take(0.5)


@pytest.mark.parametrize(
    "rate, burst, size", [(20, 40, 40), (20, 0, 40), (20, None, 40), (0.2, 0, 1), (3, 1, 1)]
)
def test_burst_defaults_to_two_seconds_worth(rate, burst, size):
    assert burst_for(rate, burst) == size
