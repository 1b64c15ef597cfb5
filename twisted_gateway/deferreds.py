"""
Joining work already in flight: several callers wait for one Deferred.

A health check and a JWKS fetch are each started once and waited for by
whoever asks meanwhile. Each caller gets its own Deferred, so that a caller
cancelling (or timing out) its wait leaves the shared work running, and the
work's own result stays with its owner.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred

_T = TypeVar("_T")


def when_done(work: Deferred[_T]) -> Deferred[None]:
    """A new Deferred that fires (with None) when ``work`` does; cancelling it leaves ``work`` alone."""
    waiter: Deferred[None] = Deferred()

    def wake(result: object) -> object:
        if not waiter.called:  # a waiter cancelled or timed out has fired already
            waiter.callback(None)
        return result

    work.addBoth(wake)
    return waiter
