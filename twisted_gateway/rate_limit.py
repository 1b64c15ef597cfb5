"""
``ws_rate_limit`` / ``ws_rate_burst``: messages per second a client may send
on one WebSocket.

One account flooding a chat room costs every upstream it reaches; the gateway
is the cheap place to stop it. A token bucket per client leg, refilled on the
injected clock: pure arithmetic on the per-message path, no timer and no
shared state (the relay closes a client over the rate with 1008 "rate limit
exceeded" on both legs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    """
    ``rate`` tokens a second, at most ``burst`` saved up; one message takes one.
    A new bucket is full: a client may open with a burst.
    """

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "TokenBucket":
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        """Take one token at ``now``; False when none is left (the message is over the rate)."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def burst_for(rate: float, burst: int | None) -> float:
    """The bucket size: ``ws_rate_burst`` when set, else two seconds' worth (at least one message)."""
    if burst:
        return float(burst)
    return max(1.0, 2 * rate)
