"""
``ws_max_age``: connection ageing, so that load spreads again after a scale-out.

Long-lived WebSockets never move on their own; closing each one after its
maximum age (1001 "connection max age" on both legs, which the client takes as
"reconnect") lets the balancer place it again. Each connection's age limit is
drawn within ±10 % of ``ws_max_age`` so that sockets opened together (after a
restart) do not all reconnect in the same second.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, TypeVar

from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    from twisted_gateway.interfaces import LiveSession

_T = TypeVar("_T")

#: Close sent to both legs of a WebSocket older than ws_max_age.
MAX_AGE = (1001, b"connection max age")
#: Each connection's limit is ws_max_age times a factor in [1 - JITTER, 1 + JITTER].
JITTER = 0.1


def age_limit(max_age: float, draw: float) -> float:
    """The age at which one connection is closed; ``draw`` is uniform in [0, 1)."""
    return max_age * (1.0 - JITTER + 2.0 * JITTER * draw)


class Ageing:
    """
    Closes each pair handed to :meth:`watch` at its age limit, on the injected
    clock; the timer is cancelled when the pair ends first (its ``done``).
    """

    def __init__(self, clock: IReactorTime, max_age: float, draw: Callable[[], float] = random.random) -> None:
        self.clock = clock
        #: seconds (0: off)
        self.max_age = max_age
        self._draw = draw

    def watch(self, pair: LiveSession) -> None:
        """Close ``pair`` (``close_both``) once it reaches its age limit, unless it ends before."""
        if not self.max_age:
            return
        call = self.clock.callLater(age_limit(self.max_age, self._draw()), pair.close_both, MAX_AGE, "max_age")

        def ended(result: _T) -> _T:
            if call.active():
                call.cancel()
            return result

        pair.done.addBoth(ended)
