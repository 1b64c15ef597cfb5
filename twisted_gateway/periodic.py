"""
A call repeated every ``interval`` seconds on an injected clock, between
:meth:`Periodic.start` and :meth:`Periodic.stop`, both safe to call twice.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Periodic:
    """``call()`` every ``interval`` s (first at once if ``now``) on ``clock``."""

    def __init__(self, clock: IReactorTime, interval: float, call: Callable[[], object], *, now: bool = False) -> None:
        self._loop = LoopingCall(call)
        self._loop.clock = clock
        self.interval, self.now = interval, now

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> Deferred[LoopingCall] | None:
        """Start unless running; the Deferred fires when stopped."""
        if self._loop.running:
            return None
        return self._loop.start(self.interval, now=self.now)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
