"""
The stop sequence of ``GatewayService`` on an injected clock: ``/readyz``
503 at once, ``drain_delay`` s of normal service with ``Connection: close``,
then the listeners and the idle client connections close, and the stop ends
when nothing is left or ``drain_timeout`` after the delay.

Client connections are ``GatewayChannel``s of the service's own site over
in-memory transports; the listeners are on a ``MemoryReactorClock``.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection

from twisted_gateway.config import parse_config
from twisted_gateway.gateway import build_gateway
from twisted_gateway.service import NEW_CONNECTION_GRACE, GatewayService

CONFIG = """
[gateway]
listen = tcp:8080
drain_delay = {delay}
drain_timeout = {timeout}
ws_ping_interval = 0

[route:api]
prefix = /v1/api
upstream = http://127.0.0.1:9
websocket = false
"""

REQUEST = b"GET %s HTTP/1.1\r\nHost: gateway\r\n\r\n"


class Client:
    """One client connection to the service's site, over an in-memory transport."""

    def __init__(self, service: GatewayService, port: int) -> None:
        self.channel = service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)

    def get(self, path: bytes) -> tuple[int, bytes | None]:
        """Status and ``Connection`` header of the answer to a GET sent now."""
        self.transport.clear()
        self.channel.dataReceived(REQUEST % path)
        head = self.transport.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in head[1:])
        return int(head[0].split(b" ")[1]), headers.get(b"connection")

    @property
    def open(self) -> bool:
        return self.transport.connected


def _started(delay: float = 0, timeout: float = 10) -> tuple[GatewayService, MemoryReactorClock]:
    clock = MemoryReactorClock()
    settings = parse_config(CONFIG.format(delay=delay, timeout=timeout))
    service = GatewayService(build_gateway(settings, clock), clock)
    service.site.reactor = clock  # the channels' own timeouts too
    service.privilegedStartService()
    service.startService()
    return service, clock


def _advance(clock: MemoryReactorClock, seconds: float) -> None:
    """Let ``seconds`` pass in steps, as the reactor would run the drain's polls."""
    steps = round(seconds / 0.01)
    for _ in range(steps):
        clock.advance(0.01)


def test_during_drain_delay_readyz_is_503_and_everything_else_is_served_with_connection_close():
    """
    From the stop until ``drain_delay`` is over: ``/readyz`` 503, ``/healthz``
    200, a request for a path without a route still answered by the router
    (404, not 503), on kept-alive and new connections alike, each response
    with ``Connection: close``; the listener is still open.
    """
    service, clock = _started(delay=5)
    kept = Client(service, 5001)
    assert kept.get(b"/healthz") == (200, None)
    assert kept.open

    stopping = service.stopService()
    _advance(clock, 4.9)
    assert Client(service, 5002).get(b"/readyz") == (503, b"close")
    assert Client(service, 5003).get(b"/healthz") == (200, b"close")
    assert kept.get(b"/nowhere") == (404, b"close")
    assert not kept.open, "a response that says Connection: close must end its connection"
    assert all(listener.running for listener in service.listeners)
    assert not stopping.called

    _advance(clock, 0.2)
    assert not any(listener.running for listener in service.listeners)
    _advance(clock, 0.1)
    assert stopping.called


def test_with_no_drain_delay_the_listener_closes_at_once_and_idle_kept_alive_connections_with_it():
    """
    ``drain_delay = 0``: the listener closes at the stop; a kept-alive
    connection waiting for its next request is closed at once; a new one
    that has not sent its request yet gets a moment and is served with
    ``Connection: close`` if the request comes.
    """
    service, clock = _started()
    kept = Client(service, 5001)
    assert kept.get(b"/healthz") == (200, None)
    new = Client(service, 5002)

    stopping = service.stopService()
    assert not any(listener.running for listener in service.listeners)
    assert not kept.open
    assert new.open
    _advance(clock, NEW_CONNECTION_GRACE / 2)
    assert new.get(b"/healthz") == (200, b"close")
    assert not new.open
    _advance(clock, 0.1)
    assert stopping.called


def test_a_new_connection_that_sends_nothing_is_closed_after_the_grace():
    """A connection accepted before the listener closed but silent since is closed as idle after the grace."""
    service, clock = _started()
    silent = Client(service, 5001)
    stopping = service.stopService()
    _advance(clock, NEW_CONNECTION_GRACE - 0.05)
    assert silent.open and not stopping.called
    _advance(clock, 0.1)
    assert not silent.open
    _advance(clock, 0.1)
    assert stopping.called


def test_a_request_arriving_when_the_listener_closes_is_served_not_cut_off():
    """A request half received when the listener closes is not idle: it is answered, with ``Connection: close``."""
    service, clock = _started()
    client = Client(service, 5001)
    assert client.get(b"/healthz") == (200, None)
    client.transport.clear()
    client.channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: gate")
    stopping = service.stopService()
    _advance(clock, NEW_CONNECTION_GRACE + 0.1)
    assert client.open and not stopping.called
    client.channel.dataReceived(b"way\r\n\r\n")
    assert client.transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in client.transport.value().lower()
    assert not client.open
    _advance(clock, 0.1)
    assert stopping.called


def test_drain_timeout_counts_from_the_end_of_drain_delay():
    """
    A connection that never finishes its request holds the stop for
    ``drain_timeout`` after ``drain_delay`` (3 + 2 s here), then is closed
    and the service stops.
    """
    service, clock = _started(delay=3, timeout=2)
    stuck = Client(service, 5001)
    stuck.channel.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    stopping = service.stopService()
    _advance(clock, 4.9)
    assert stuck.open and not stopping.called
    _advance(clock, 0.2)
    assert not stuck.open
    assert stopping.called


class _DeafPair:
    """A WebSocket pair whose client never answers the close (it goes only when the process does)."""

    def __init__(self) -> None:
        self.done: Deferred = Deferred()
        self.closes: list = []

    def close_both(self, code, reason) -> None:
        self.closes.append(code)


def test_a_pair_that_never_finishes_its_close_holds_the_stop_for_drain_timeout_only():
    """
    A client that never answers the close: the stop ends ``drain_timeout``
    after the listeners closed, and the pair's own ``done`` is left alone
    (it still fires later, as its connection ends).
    """
    service, clock = _started(timeout=2)
    pair = _DeafPair()
    service.gateway.registry.pairs.add(pair)
    stopping = service.stopService()
    _advance(clock, 1.9)
    assert pair.closes == [(1001, b"going away")] and not stopping.called
    _advance(clock, 0.2)
    assert stopping.called
    assert not pair.done.called
    pair.done.callback(None)


def test_a_listener_that_cannot_bind_exits_with_one_line_naming_the_endpoint(capsys):
    """A taken port: ``wsgateway: ROLE cannot listen on ENDPOINT: REASON`` and exit 1, no traceback."""
    import socket

    import pytest
    from twisted.internet import reactor
    from twisted.web.server import Site
    from twisted.web.resource import Resource

    from twisted_gateway.service import ListeningService

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
    try:
        listener = ListeningService(reactor, description, Site(Resource()), "wsgateway")
        with pytest.raises(SystemExit) as exited:
            listener.privilegedStartService()
    finally:
        taken.close()
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wsgateway: wsgateway cannot listen on {description}: ")


def test_when_listening_gives_the_bound_port_before_and_after_it_is_bound():
    """Asked before the service starts or after: the same listening port."""
    clock = MemoryReactorClock()
    service = GatewayService(build_gateway(parse_config(CONFIG.format(delay=0, timeout=1)), clock), clock)
    (listener,) = service.listeners
    early = listener.when_listening()
    assert not early.called
    service.privilegedStartService()
    service.startService()
    port = early.result
    assert listener.when_listening().result is port
    assert port.getHost().port == 8080
    stopped = service.stopService()
    _advance(clock, 1)
    assert stopped.called
