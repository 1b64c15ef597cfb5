"""Joining a Deferred already in flight (health checks, JWKS fetches)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock

from twisted_gateway.deferreds import start, when_done


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


# -- start: a coroutine without Twisted's driver when it does not wait -----------------------


def _outcome(d: Deferred) -> object:
    """What ``d`` fired with (an exception for a failure); the failure is handled."""
    results: list[object] = []
    d.addCallbacks(results.append, lambda f: results.append(f.value))
    assert results, "not fired"
    return results[0]


def test_a_coroutine_that_does_not_wait_gives_its_result_at_once() -> None:
    async def cached() -> str:
        return "identity"

    async def refused() -> str:
        raise ValueError("bad token")

    assert _outcome(start(cached())) == "identity"
    assert isinstance(_outcome(start(refused())), ValueError)


def test_a_coroutine_that_waits_gets_each_result_and_failure_as_it_would_under_from_coroutine() -> None:
    first: Deferred[int] = Deferred()
    second: Deferred[int] = Deferred()
    seen: list[object] = []

    async def work() -> str:
        seen.append(await first)
        try:
            await second
        except KeyError as e:
            seen.append(e)
        seen.append(await succeed(3))  # fired already: no wait
        return "done"

    d = start(work())
    assert not d.called
    first.callback(1)
    assert seen == [1] and not d.called
    second.errback(KeyError("k"))
    assert _outcome(d) == "done"
    assert seen[0] == 1 and isinstance(seen[1], KeyError) and seen[2] == 3


def test_cancelling_cancels_what_the_coroutine_waits_on() -> None:
    waited: Deferred[int] = Deferred()
    inside: list[type] = []

    async def work() -> None:
        try:
            await waited
        except CancelledError:
            inside.append(CancelledError)
            raise

    d = start(work())
    d.cancel()
    assert waited.called and inside == [CancelledError]
    assert isinstance(_outcome(d), CancelledError)
