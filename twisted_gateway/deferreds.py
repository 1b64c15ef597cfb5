"""
Joining work already in flight: several callers wait for one Deferred.

A health check and a JWKS fetch are each started once and waited for by
whoever asks meanwhile. Each caller gets its own Deferred, so that a caller
cancelling (or timing out) its wait leaves the shared work running, and the
work's own result stays with its owner.

And :func:`start`: a coroutine that seldom waits (an authentication whose
token is cached) run without Twisted's driver when it does not.
"""

from __future__ import annotations

from typing import Coroutine, Generator, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

_T = TypeVar("_T")


def start(coroutine: Coroutine[Deferred[object], object, _T]) -> Deferred[_T]:
    """
    ``Deferred.fromCoroutine(coroutine)``, the same result and cancellation,
    but a coroutine that ends without waiting for anything gives an
    already-fired Deferred: none of the driver's Deferreds and context
    switches (about as much as the work of a request's cached token check).
    """
    try:
        awaited = coroutine.send(None)
    except StopIteration as done:
        return succeed(done.value)
    except BaseException:
        return fail()
    return Deferred.fromCoroutine(_resume(coroutine, awaited))


def _resume(
    coroutine: Coroutine[Deferred[object], object, _T], awaited: Deferred[object]
) -> Generator[Deferred[object], object, _T]:
    """
    Hands Twisted's driver what ``coroutine`` (started already) waits on, and
    passes on what comes back, a result or an exception, as the driver would.
    """
    while True:
        try:
            result = yield awaited
        except BaseException as error:
            try:
                awaited = coroutine.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        try:
            awaited = coroutine.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def when_done(work: Deferred[_T]) -> Deferred[None]:
    """A new Deferred that fires (with None) when ``work`` does; cancelling it leaves ``work`` alone."""
    waiter: Deferred[None] = Deferred()

    def wake(result: object) -> object:
        if not waiter.called:  # a waiter cancelled or timed out has fired already
            waiter.callback(None)
        return result

    work.addBoth(wake)
    return waiter
