"""
``ws_send_timeout``: a peer that stops reading is let go, as nginx's
``send_timeout`` does.

A chat app frozen in the background keeps its connection open and reads
nothing: the relay stops reading the other leg (backpressure), and with pings
off nothing would ever end the pair. One timer for the whole gateway, on the
injected clock, looks at every open leg: a leg that has had bytes waiting for
its peer (in Twisted's buffer or the kernel's) while the peer acknowledged
none of them for ``timeout`` seconds is handed to its pair
(``RelayServerProtocol.slow_consumer``), which closes both legs.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted_gateway.periodic import Periodic

from twisted_gateway.sockets import send_state, tcp_transport
from twisted_gateway.ws_relay import OPEN, RelayRegistry

#: Seconds between two looks at most: a stalled leg is let go within timeout + 2 x this.
MAX_TICK = 5.0

#: ``probe(transport)``: (bytes waiting for the peer, bytes it acknowledged so far)
Probe = Callable[[object], "tuple[int, int]"]


def queued_bytes(transport: object) -> int:
    """Bytes Twisted holds for the socket under ``transport`` (not yet given to the kernel)."""
    owner = tcp_transport(transport) or transport
    buffered = getattr(owner, "dataBuffer", b"")
    return len(buffered) - getattr(owner, "offset", 0) + getattr(owner, "_tempDataLen", 0)


def send_backlog(transport: object) -> tuple[int, int]:
    """
    What waits for the peer (Twisted's buffer, and the kernel's unsent and
    unacknowledged bytes) and what the peer acknowledged so far. Without the
    kernel's counters (not TCP, not Linux) only Twisted's buffer is seen, and
    no progress.
    """
    queued = queued_bytes(transport)
    state = send_state(transport)
    if state is None:
        return queued, 0
    return queued + state.waiting, state.acked


class SendTimeout:
    """Closes the pairs of legs whose peer stopped reading; see the module docstring."""

    def __init__(
        self,
        registry: RelayRegistry,
        clock: IReactorTime,
        timeout: float,
        probe: Probe = send_backlog,
    ) -> None:
        self.registry, self.clock, self.timeout = registry, clock, timeout
        self.probe = probe
        self.tick = min(timeout / 4, MAX_TICK)
        self._loop = Periodic(clock, self.tick, self.check)

    def start(self) -> None:
        if self.timeout > 0:
            self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def check(self) -> None:
        """One look at every open leg."""
        now = self.clock.seconds()
        for pair in list(self.registry.pairs):
            for leg in pair.legs():
                if leg.state != OPEN or leg.transport is None:
                    continue
                waiting, acked = self.probe(leg.transport)
                if not waiting:
                    leg.stalled = None
                elif leg.stalled is None or leg.stalled[1] != acked:
                    leg.stalled = (now, acked)  # waiting since now, or moving
                elif now - leg.stalled[0] >= self.timeout:
                    pair.slow_consumer(leg)
                    break
