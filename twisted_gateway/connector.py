"""
How the gateway reaches an upstream, one :class:`UpstreamConnector` shared by
the HTTP forwarder (``upstream_client.UpstreamClient``), the WebSocket relay
and the health checks: TCP, with TLS for https and wss.
"""

from __future__ import annotations

import ipaddress
from functools import partial
from typing import Callable, cast

from autobahn.twisted.websocket import WebSocketClientFactory

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, NoProtocol
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocol,
    IProtocolFactory,
    IReactorSSL,
    IReactorTCP,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from twisted_gateway._compat import connect_tcp_now, forget_transport
from twisted_gateway.interfaces import IUpstreamConnector

#: What a connect calls with the protocol, and with why it failed.
Connected = Callable[[IProtocol], object]
Failed = Callable[[Failure], object]
#: Connects one upstream WebSocket leg's factory for the relay, then calls ``connected``
#: with the leg (by the time its ``connectionMade`` runs) or ``failed`` with why not;
#: what it returns cancels the connect (``failed`` then gets a ``ConnectingCancelledError``
#: or ``CancelledError``). :meth:`UpstreamConnector.untimed`, or any
#: :class:`IUpstreamConnector`'s ``connect`` through :func:`relay_connect`.
RelayConnect = Callable[[WebSocketClientFactory, Connected, Failed], Callable[[], None]]
#: Connects one upstream WebSocket leg's factory; fires with the leg (an
#: :class:`IUpstreamConnector`'s ``connect``: the health checks').
Connector = Callable[[WebSocketClientFactory], Deferred[IProtocol]]


def relay_connect(connector: IUpstreamConnector) -> RelayConnect:
    """
    How the relay connects its upstream legs through ``connector``: the relay
    times each connect itself (``connect_timeout``, on the handshake's one
    timer), so an :class:`UpstreamConnector` connects them without a timer of
    its own, and calls back without a ``Deferred``; any other connector as it
    connects, its ``Deferred`` calling back.
    """
    if isinstance(connector, UpstreamConnector):
        return connector.untimed

    def connect(factory: WebSocketClientFactory, connected: Connected, failed: Failed) -> Callable[[], None]:
        connecting = connector.connect(factory)
        connecting.addCallbacks(connected, failed)
        return connecting.cancel

    return connect


class _Attempt(ClientFactory):
    """
    One connection attempt to an IP literal (:meth:`UpstreamConnector.connect_to`,
    :meth:`UpstreamConnector.untimed`): the protocol the caller's factory
    builds is the transport's own, with no wrapper under its events
    (``HostnameEndpoint`` and ``TCP4ClientEndpoint`` put one under every
    event of the connection). ``connected`` is called with the protocol as
    it is built, just before the transport calls its ``connectionMade`` (a
    protocol writes from there on), or ``failed`` with why none was.
    """

    noisy = False

    def __init__(self, factory: IProtocolFactory, connected: Connected, failed: Failed) -> None:
        self.factory = factory
        self.connector: IConnector | None = None
        self._connected, self._failed = connected, failed
        #: neither ``connected`` nor ``failed`` was called yet
        self.pending = True

    def cancel(self) -> None:
        """Cancelled before the connection is made: fails as an endpoint's connect does."""
        if not self.pending:
            return
        connector = self.connector
        assert connector is not None  # connectTCP calls startedConnecting before it returns
        self.pending = False
        self._failed(Failure(ConnectingCancelledError(connector.getDestination())))
        connector.stopConnecting()

    def startedConnecting(self, connector: IConnector) -> None:
        self.connector = connector

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]  # any factory's protocol
        try:
            protocol = self.factory.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            self.pending = False
            self._failed(Failure())
            return None
        self.pending = False
        self._connected(protocol)
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connector = None
        if self.pending:
            self.pending = False
            self._failed(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        # The connector, its transport and this attempt hold one another: let
        # go, so that they are freed with the connection, not by the cycle collector.
        self.connector = None
        forget_transport(connector)


#: How one upstream address is connected: (factory, timed, connected, failed) -> its cancel.
_Way = Callable[[IProtocolFactory, bool, Connected, Failed], Callable[[], None]]


def _by_endpoint(
    endpoint: IStreamClientEndpoint, factory: IProtocolFactory, timed: bool, connected: Connected, failed: Failed
) -> Callable[[], None]:
    """A name's connect, by its endpoint (timed by it, whatever ``timed`` says)."""
    connecting = endpoint.connect(factory)
    connecting.addCallbacks(connected, failed)
    return connecting.cancel


def upstream_endpoint(
    reactor: IReactorTCP, host: bytes, port: int, timeout: float, tls_policy: IPolicyForHTTPS | None = None
) -> IStreamClientEndpoint:
    """
    The endpoint of one upstream: TCP, with TLS when ``tls_policy`` (an
    ``IPolicyForHTTPS``) is given, which makes the connection creator for the
    host and port (certificate and host name checks). An IP literal is
    connected directly: ``HostnameEndpoint`` would resolve it in a thread on
    every connection (a third of a WebSocket handshake's CPU), and when file
    descriptors run out that resolution fails as a DNS error, blaming the
    upstream. Names resolve.
    """
    address = ip_literal(host)
    if address is None:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    elif ":" in address:
        endpoint = TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    else:
        endpoint = TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
    return endpoint if tls_policy is None else wrapClientTLS(tls_policy.creatorForNetloc(host, port), endpoint)


def ip_literal(host: bytes) -> str | None:
    """``host``'s address when it is an IP literal (``[...]`` or not), else None."""
    try:
        return str(ipaddress.ip_address(host.decode("ascii").strip("[]")))
    except (UnicodeDecodeError, ValueError):
        return None


@implementer(IUpstreamConnector, IAgentEndpointFactory)
class UpstreamConnector:
    """
    Connects to upstreams over TCP, or TLS (``https``, ``wss``) with
    ``tls_policy`` (by default the system trust store verifies the certificate
    and host name), each connect timed out after ``timeout`` seconds.

    :meth:`connect_to` serves the HTTP forwarder and :meth:`connect` the
    WebSocket relay: an IP literal goes straight to ``reactor.connectTCP`` or
    ``connectSSL`` (see :class:`_Attempt`: its ``Deferred`` fires as the
    protocol is built, and no wrapper sits under the connection's events), a
    name through ``HostnameEndpoint``. :meth:`endpointForURI` gives
    ``Agent`` (the health checks) the endpoints it expects.
    """

    def __init__(self, reactor: IReactorTCP, timeout: float, tls_policy: IPolicyForHTTPS | None = None) -> None:
        """``reactor`` connects and times the connects out."""
        self.reactor, self.timeout = reactor, timeout
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        #: how each (secure, host, port) is connected: an IP literal's by the reactor
        #: (:meth:`_connect_literal`, timed or not), a name's by its endpoint (always timed)
        self._ways: dict[tuple[bool, bytes, int], _Way] = {}
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def connect(self, factory: WebSocketClientFactory, timed: bool = True) -> Deferred[IProtocol]:
        """Connect a WebSocket leg's factory to its ``host`` and ``port`` (see :meth:`connect_to`)."""
        return self.connect_to(factory.isSecure, factory.host.encode("idna"), factory.port, factory, timed)

    def untimed(self, factory: WebSocketClientFactory, connected: Connected, failed: Failed) -> Callable[[], None]:
        """
        :meth:`connect` for a caller that times the connect itself (the
        relay's handshakes: one timer for the connect and the upgrade), which
        is called back instead of given a ``Deferred`` (:data:`RelayConnect`).
        """
        return self._way_to(factory.isSecure, factory.host.encode("idna"), factory.port)(
            factory, False, connected, failed
        )

    def connect_to(
        self, secure: bool, host: bytes, port: int, factory: IProtocolFactory, timed: bool = True
    ) -> Deferred[IProtocol]:
        """
        Connect ``factory`` to ``host`` and ``port``, with TLS when ``secure``.
        The ``Deferred`` fires with the protocol by the time its
        ``connectionMade`` runs (for an IP literal, just before): the protocol
        writes from ``connectionMade`` on. Cancelled before, it fails with
        ``ConnectingCancelledError``; a connect timeout fails it with
        ``TimeoutError``. Not ``timed``, an IP literal's connect has no timer
        (its caller cancels it when it is due); a name's endpoint keeps its own.
        """
        cancel: list[Callable[[], None]] = []
        connecting: Deferred[IProtocol] = Deferred(lambda d: cancel[0]())
        cancel.append(self._way_to(secure, host, port)(factory, timed, connecting.callback, connecting.errback))
        return connecting

    def _way_to(self, secure: bool, host: bytes, port: int) -> _Way:
        key = (secure, host, port)
        way = self._ways.get(key)
        if way is None:
            way = self._ways[key] = self._way(secure, host, port)
        return way

    def _way(self, secure: bool, host: bytes, port: int) -> _Way:
        address = ip_literal(host)
        tls = self.tls_policy if secure else None
        if address is None:
            return partial(_by_endpoint, upstream_endpoint(self.reactor, host, port, self.timeout, tls))
        creator = None if tls is None else tls.creatorForNetloc(host, port)
        return partial(self._connect_literal, address, port, creator)

    def _connect_literal(
        self,
        address: str,
        port: int,
        creator: object | None,
        factory: IProtocolFactory,
        timed: bool,
        connected: Connected,
        failed: Failed,
    ) -> Callable[[], None]:
        """Connect to an IP literal by the reactor, with TLS from ``creator`` when not None."""
        attempt = _Attempt(factory, connected, failed)
        timeout = self.timeout if timed else None
        if creator is None:
            connect_tcp_now(self.reactor, address, port, attempt, timeout)  # (None: no timer, as Twisted's connectors take it)
        else:
            cast(IReactorSSL, self.reactor).connectSSL(
                address, port, attempt, creator, timeout, None  # type: ignore[arg-type]
            )
        return attempt.cancel

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """``Agent``'s endpoint for an ``http`` or ``https`` upstream, built once per origin."""
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            tls = self.tls_policy if uri.scheme == b"https" else None
            endpoint = upstream_endpoint(self.reactor, uri.host, uri.port, self.timeout, tls)
            self._endpoints[key] = endpoint
        return endpoint
