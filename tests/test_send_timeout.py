"""ws_send_timeout on an injected clock: which legs are let go, and when (no sockets)."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_gateway.send_timeout import SendTimeout, queued_bytes
from twisted_gateway.ws_relay import CLOSED, OPEN, RelayRegistry

TIMEOUT = 60.0


class _Leg:
    """A relay leg as the send timeout sees it: a state, a transport, its bookkeeping."""

    stalled = None

    def __init__(self, name: str) -> None:
        self.name, self.state, self.transport = name, OPEN, name


class _Pair(_Leg):
    """A ws_pair.Pair whose client leg stands for itself."""

    def __init__(self) -> None:
        super().__init__("client")
        self.partner = _Leg("upstream")
        self.slow: list[str] = []

    def legs(self) -> tuple[_Leg, _Leg]:
        return (self, self.partner)

    def slow_consumer(self, leg: _Leg) -> None:
        self.slow.append(leg.name)
        self.state = self.partner.state = CLOSED


class _Kernel:
    """What ``probe`` reports per transport: (bytes waiting, bytes acknowledged)."""

    def __init__(self) -> None:
        self.sending: dict[str, tuple[int, int]] = {}

    def __call__(self, transport: str) -> tuple[int, int]:
        return self.sending.get(transport, (0, 0))


def _watch(timeout: float = TIMEOUT) -> tuple[SendTimeout, Clock, _Pair, _Kernel]:
    registry, clock, kernel, pair = RelayRegistry(), Clock(), _Kernel(), _Pair()
    registry.pairs.add(pair)
    watch = SendTimeout(registry, clock, timeout, probe=kernel)
    watch.start()
    return watch, clock, pair, kernel


def _advance(clock: Clock, seconds: float, step: float = 1.0) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_a_client_that_accepts_nothing_is_let_go_within_the_timeout_and_two_looks():
    watch, clock, pair, kernel = _watch()
    kernel.sending["client"] = (300_000, 5000)
    _advance(clock, TIMEOUT)
    assert pair.slow == []  # first seen waiting at the first look, 5 s in
    _advance(clock, 2 * watch.tick)
    assert pair.slow == ["client"]
    watch.stop()


def test_an_upstream_that_accepts_nothing_is_let_go_too():
    watch, clock, pair, kernel = _watch()
    kernel.sending["upstream"] = (1, 0)
    _advance(clock, TIMEOUT + 2 * watch.tick)
    assert pair.slow == ["upstream"]
    watch.stop()


def test_a_slow_reader_that_accepts_a_byte_now_and_then_is_kept():
    watch, clock, pair, kernel = _watch()
    for acked in range(40):
        kernel.sending["client"] = (300_000, acked)
        _advance(clock, TIMEOUT / 2)
    assert pair.slow == []
    watch.stop()


def test_a_leg_with_nothing_waiting_is_never_let_go_and_waiting_again_starts_over():
    watch, clock, pair, kernel = _watch()
    _advance(clock, 10 * TIMEOUT)
    assert pair.slow == []
    kernel.sending["client"] = (10, 0)
    _advance(clock, TIMEOUT - watch.tick)
    kernel.sending["client"] = (0, 10)  # drained
    _advance(clock, watch.tick)
    kernel.sending["client"] = (10, 10)
    _advance(clock, TIMEOUT - watch.tick)
    assert pair.slow == []
    watch.stop()


def test_closed_legs_are_not_looked_at():
    watch, clock, pair, kernel = _watch()
    pair.state = pair.partner.state = CLOSED
    kernel.sending["client"] = kernel.sending["upstream"] = (10, 0)
    _advance(clock, 3 * TIMEOUT)
    assert pair.slow == []
    watch.stop()


def test_a_short_timeout_is_looked_at_four_times_and_zero_turns_it_off():
    watch, clock, pair, kernel = _watch(timeout=2.0)
    assert watch.tick == 0.5
    kernel.sending["client"] = (10, 0)
    _advance(clock, 3.0, step=0.5)
    assert pair.slow == ["client"]
    watch.stop()
    assert clock.getDelayedCalls() == []
    off, clock, _, _ = _watch(timeout=0)
    assert clock.getDelayedCalls() == []
    off.stop()


def test_queued_bytes_counts_what_twisted_holds_for_the_socket():
    class Transport:
        dataBuffer, offset, _tempDataLen = b"x" * 100, 30, 7

    assert queued_bytes(Transport()) == 77
    assert queued_bytes(object()) == 0
