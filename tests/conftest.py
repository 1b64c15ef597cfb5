"""
Shared fixtures. ``leaves_nothing_behind`` runs around every test: a test that
leaves a listener, a connection or a delayed call on the reactor, or a failed
Deferred that nobody handled, fails and is told what it left
(pytest-twisted checks none of this).
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, globalLogPublisher

from tests.support import selectables, settle

#: How long what a test ended is given to go: closes take a few reactor turns.
#: A guard against a leak, not a speed expectation.
GRACE = 5.0


def _timers() -> set[Any]:
    return {call for call in reactor.getDelayedCalls() if call.active()}


def _leaks(sockets: set[Any], timers: set[Any]) -> tuple[set[Any], set[Any]]:
    return selectables() - sockets, _timers() - timers


async def _closed(clean: Callable[[], bool], grace: float) -> None:
    """Turn the reactor once, then until ``clean()`` for up to ``grace`` seconds."""
    await task.deferLater(reactor, 0, lambda: None)
    await settle(clean, "nothing left", grace)


@pytest.fixture(autouse=True)
def leaves_nothing_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves reactor state or an unhandled failed Deferred behind; then clean up."""
    if not reactor.running:  # its first turn adds what it holds for itself (its wakers)
        pytest_twisted.blockon(task.deferLater(reactor, 0, lambda: None))
    sockets, timers = selectables(), _timers()
    failed: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        # how a Deferred garbage collected with a failure nobody handled reports it
        if event.get("log_namespace") == "twisted.internet.defer" and "log_failure" in event:
            failed.append(event)

    def clean() -> bool:
        return _leaks(sockets, timers) == (set(), set())

    globalLogPublisher.addObserver(observe)
    try:
        yield
        # The reactor is turned only for what is still closing: most tests leave nothing.
        grace = 0.0 if request.node.get_closest_marker("cleans_up_at_once") else GRACE
        if not clean():
            try:
                pytest_twisted.blockon(Deferred.fromCoroutine(_closed(clean, grace)))
            except AssertionError:
                pass
    finally:
        globalLogPublisher.removeObserver(observe)
    left_selectables, left_timers = _leaks(sockets, timers)
    problems = [f"listener or connection: {s!r}" for s in left_selectables]
    problems += [f"delayed call: {c!r}" for c in left_timers]
    problems += [f"failed Deferred nobody handled: {e['log_failure'].getTraceback()}" for e in failed]
    # Clean up so that the next test starts from nothing, then fail this one.
    for call in left_timers:
        call.cancel()
    for selectable in left_selectables:
        stop = getattr(selectable, "abortConnection", None) or getattr(selectable, "stopListening", None)
        if stop is not None:
            stop()
    if problems:
        pytest.fail("test left behind:\n  " + "\n  ".join(problems), pytrace=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    """
    What start-up and collection built (modules, test items) lives as long as the
    process: frozen out of the cycle collector's full passes, which would walk it
    again each time the tests' garbage triggers one (about 1 ms of CPU a test).
    """
    gc.freeze()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: a benchmark's machinery at length: `make test-bench`, not `make test`")
    config.addinivalue_line(
        "markers", "cleans_up_at_once: the leak guard gives the test no grace period to close what it opened"
    )
