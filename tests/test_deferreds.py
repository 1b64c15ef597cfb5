"""Joining a Deferred already in flight (health checks, JWKS fetches)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from twisted_gateway.deferreds import when_done


def test_each_waiter_fires_with_none_and_the_work_keeps_its_result() -> None:
    work: Deferred[str] = Deferred()
    first, second = when_done(work), when_done(work)
    fired: list[object] = []
    first.addCallback(fired.append)
    second.addCallback(fired.append)
    work.callback("result")
    assert fired == [None, None]
    assert work.result == "result"


def test_a_failure_wakes_the_waiter_and_stays_with_the_work() -> None:
    work: Deferred[str] = Deferred()
    waiter = when_done(work)
    work.errback(ValueError("boom"))
    assert waiter.called and waiter.result is None
    errors: list[BaseException] = []
    work.addErrback(lambda f: errors.append(f.value))
    assert isinstance(errors[0], ValueError)


def test_a_waiter_cancelled_or_timed_out_leaves_the_work_running() -> None:
    clock = Clock()
    work: Deferred[str] = Deferred()
    cancelled, timed_out = when_done(work), when_done(work).addTimeout(1, clock)
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    cancelled.cancel()
    clock.advance(1)
    timed_out.addErrback(lambda f: None)
    assert not work.called
    work.callback("late")  # waking waiters that already fired is no error
    assert work.result == "late"
