"""The upstream connector's own attempts: an IP literal straight to connectTCP/connectSSL (loopback use in integration/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, NoProtocol, TimeoutError
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import URI

from twisted_gateway import _compat
from twisted_gateway.connector import UpstreamConnector, _Attempt, relay_connect
from tests.support import settle

ADDRESS = IPv4Address("TCP", "127.0.0.1", 9001)


class _Policy:
    """An ``IPolicyForHTTPS`` that tells which netloc it made a creator for."""

    def creatorForNetloc(self, host: bytes, port: int) -> tuple[bytes, int]:
        return (host, port)


@pytest.mark.parametrize(
    ("host", "secure", "address"),
    [
        (b"127.0.0.1", False, "127.0.0.1"),
        (b"[::1]", False, "::1"),
        (b"::1", False, "::1"),
        (b"10.0.0.7", True, "10.0.0.7"),
    ],
)
def test_an_ip_literal_is_connected_with_the_timeout_and_no_resolution(host: bytes, secure: bool, address: str) -> None:
    reactor = MemoryReactorClock()
    connector = UpstreamConnector(reactor, 7.5, _Policy())  # type: ignore[arg-type]  # a policy's one method
    connector.connect_to(secure, host, 9001, Factory.forProtocol(Protocol))
    if secure:
        [(connected, port, _, creator, timeout, _)] = reactor.sslClients
        assert creator == (host, 9001) and not reactor.tcpClients
    else:
        [(connected, port, _, timeout, _)] = reactor.tcpClients
    assert (connected, port, timeout) == (address, 9001, 7.5)


@pytest.mark.parametrize("secure", [False, True])
def test_the_relays_connects_to_an_ip_literal_have_no_timer_and_call_back(secure: bool) -> None:
    """
    The relay times its upstream connects itself (ws_proxy): relay_connect's
    are the connector's untimed ones, which call the relay back with the
    protocol as it is built (no Deferred); cancelled once it is, nothing more.
    """
    from autobahn.twisted.websocket import WebSocketClientFactory

    reactor = MemoryReactorClock()
    connector = UpstreamConnector(reactor, 7.5, _Policy())  # type: ignore[arg-type]  # a policy's one method
    factory = WebSocketClientFactory(f"{'wss' if secure else 'ws'}://10.0.0.7:9001/")
    assert relay_connect(connector) == connector.untimed
    results: list[object] = []
    cancel = relay_connect(connector)(factory, results.append, results.append)
    clients = reactor.sslClients if secure else reactor.tcpClients
    assert clients[0][4 if secure else 3] is None
    assert reactor.getDelayedCalls() == []
    assert results == []
    built = clients[0][2].buildProtocol(ADDRESS)
    assert results == [built] and built is not None
    cancel()
    assert results == [built] and not reactor.connectors[0].stoppedConnecting


def test_the_relays_connects_through_another_connector_call_back_from_its_deferred() -> None:
    """Any other connector connects as it does; its Deferred calls the relay back, and the relay's cancel cancels it."""
    from autobahn.twisted.websocket import WebSocketClientFactory

    connecting: list[Deferred[IProtocol]] = []

    def connect(factory: object) -> Deferred[IProtocol]:
        connecting.append(Deferred(lambda d: d.errback(ConnectingCancelledError(ADDRESS))))
        return connecting[-1]

    relay = relay_connect(SimpleNamespace(connect=connect))  # type: ignore[arg-type]  # the one method used
    factory = WebSocketClientFactory("ws://10.0.0.7:9001/")
    results: list[object] = []
    cancel = relay(factory, results.append, results.append)
    cancel()
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(ConnectingCancelledError)
    relay(factory, results.append, results.append)
    leg = Protocol()
    connecting[1].callback(leg)
    assert results[1] is leg


def test_the_callers_protocol_is_the_transports_own_and_fires_as_it_is_built() -> None:
    reactor = MemoryReactorClock()
    factory = Factory.forProtocol(Protocol)
    d = UpstreamConnector(reactor, 5).connect_to(False, b"127.0.0.1", 9001, factory)
    attempt = reactor.tcpClients[0][2]
    assert not d.called
    built = attempt.buildProtocol(ADDRESS)
    assert type(built) is Protocol and built.factory is factory  # no wrapper between transport and protocol
    assert outcome(d) is built


def test_cancelled_before_the_connection_it_stops_connecting_as_an_endpoint_does() -> None:
    reactor = MemoryReactorClock()
    d = UpstreamConnector(reactor, 5).connect_to(False, b"127.0.0.1", 9001, Factory.forProtocol(Protocol))
    d.cancel()
    failure = outcome(d)
    assert isinstance(failure, Failure)
    assert failure.check(ConnectingCancelledError)
    assert failure.value.address == ADDRESS
    assert reactor.connectors[0].stoppedConnecting


@pytest.mark.parametrize("reason", [TimeoutError(), NoProtocol()])
def test_a_failed_connect_fails_with_its_reason(reason: Exception) -> None:
    reactor = MemoryReactorClock()
    d = UpstreamConnector(reactor, 5).connect_to(False, b"127.0.0.1", 9001, Factory.forProtocol(Protocol))
    attempt = reactor.tcpClients[0][2]
    attempt.clientConnectionFailed(reactor.connectors[0], Failure(reason))
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.value is reason


class _Nothing(Factory):
    def buildProtocol(self, addr: object) -> None:
        return None


def test_a_factory_that_builds_nothing_fails_the_connect() -> None:
    reactor = MemoryReactorClock()
    factory = _Nothing()
    d = UpstreamConnector(reactor, 5).connect_to(False, b"127.0.0.1", 9001, factory)
    assert reactor.tcpClients[0][2].buildProtocol(ADDRESS) is None
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(NoProtocol)


def test_a_name_resolves_and_agent_gets_endpoints() -> None:
    reactor = MemoryReactorClock()
    connector = UpstreamConnector(reactor, 5)
    connector.connect_to(False, b"upstream.example", 80, Factory.forProtocol(Protocol))
    assert not isinstance(reactor.tcpClients[0][2], _Attempt)  # through HostnameEndpoint
    endpoint = connector.endpointForURI(URI.fromBytes(b"http://upstream.example:80/"))
    assert isinstance(endpoint, HostnameEndpoint)
    assert connector.endpointForURI(URI.fromBytes(b"http://upstream.example:80/x")) is endpoint


def outcome(d: Deferred[IProtocol]) -> object:
    """What ``d`` fired with (a Failure or a result): it has fired already."""
    results: list[object] = []
    d.addBoth(results.append)
    [result] = results
    return result


class _Recorded(Protocol):
    """A protocol that tells when its connection was made and lost."""

    made = lost = False

    def connectionMade(self) -> None:
        self.made = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


def _scheduled_connects() -> list[object]:
    from twisted.internet import reactor

    return [call for call in reactor.getDelayedCalls() if getattr(call.func, "__name__", "") in ("resolveAddress", "doConnect")]


@pytest_twisted.ensureDeferred
async def test_a_literals_connect_starts_within_the_call_and_connects_as_twisteds_does() -> None:
    """No reactor turn before the socket's connect: nothing left scheduled for it; the connection is then made as ever."""
    from twisted.internet import reactor

    server = Factory.forProtocol(_Recorded)
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    try:
        connector = UpstreamConnector(reactor, 5)  # type: ignore[arg-type]  # (the global reactor)
        connecting = connector.connect_to(False, b"127.0.0.1", port.getHost().port, Factory.forProtocol(_Recorded), timed=False)
        assert not connecting.called and not _scheduled_connects()
        client = await connecting
        assert isinstance(client, _Recorded)
        await settle(lambda: client.made, "the connection made")
        # a TCP transport to write_now and peer_of, whose fast paths take the types they know
        assert type(client.transport) in _compat._TCP and _compat.peer_of(client.transport).startswith("tcp4:127.0.0.1:")
        # connected: watched for reading, not writing, as Twisted's doConnect leaves it
        assert client.transport in reactor.getReaders() and client.transport not in reactor.getWriters()
        client.transport.loseConnection()
        await settle(lambda: client.lost, "the connection closed")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_refused_connect_to_a_literal_fails_after_the_call_as_twisteds_does() -> None:
    """A closed port: the connect fails with ConnectionRefusedError, never inside the caller's connect."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    connector = UpstreamConnector(reactor, 5)  # type: ignore[arg-type]  # (the global reactor)
    connecting = connector.connect_to(False, b"127.0.0.1", number, Factory.forProtocol(Protocol), timed=False)
    assert not connecting.called
    with pytest.raises(ConnectionRefusedError):
        await connecting
