"""
Shared fixtures. ``no_leaks`` runs around every test: a test that leaves a
socket open or a gateway timer pending fails (pytest-twisted does not check).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task

#: Modules whose pending timers after a test are a leak of ours.
OWN_MODULES = ("twisted_gateway",)


def _own_delayed_calls():
    own = []
    for call in reactor.getDelayedCalls():
        func = call.func
        module = getattr(func, "__module__", "") or ""
        name = getattr(func, "__qualname__", "") or ""
        owner = getattr(getattr(func, "__self__", None), "__class__", None)
        owner_module = getattr(owner, "__module__", "") or ""
        if module.startswith(OWN_MODULES) or owner_module.startswith(OWN_MODULES) or "time_out" in name:
            own.append(call)
    return own


def _sockets():
    return set(reactor.getReaders()) | set(reactor.getWriters())


@pytest_twisted.async_yield_fixture(autouse=True)
async def no_leaks(request):
    if request.node.get_closest_marker("no_reactor_check"):
        yield
        return
    before = _sockets()
    yield
    left, calls = set(), []
    for _ in range(60):
        left = _sockets() - before
        calls = _own_delayed_calls()
        if not left and not calls:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"test left behind sockets {left!r} and timers {calls!r}")


def pytest_configure(config):
    config.addinivalue_line("markers", "no_reactor_check: skip the socket/timer leak check")
