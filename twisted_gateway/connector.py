"""
How the gateway reaches an upstream, shared by the HTTP forwarder
(``http_proxy.UpstreamEndpoints``) and the WebSocket relay
(:class:`EndpointConnector`): TCP, with TLS for https and wss.
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from autobahn.twisted.websocket import WebSocketClientFactory

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IProtocol, IReactorTCP, IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twisted_gateway.interfaces import IUpstreamConnector

#: Connects one upstream WebSocket leg's factory; fires with the leg
#: (an :class:`IUpstreamConnector`'s ``connect``).
Connector = Callable[[WebSocketClientFactory], Deferred[IProtocol]]


def tcp_endpoint(reactor: IReactorTCP, host: bytes, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    An IP literal is connected directly: ``HostnameEndpoint`` would resolve it
    in a thread on every connection (a third of a WebSocket handshake's CPU),
    and when file descriptors run out that resolution fails as a DNS error,
    blaming the upstream. Names resolve.
    """
    try:
        address = ipaddress.ip_address(host.decode("ascii").strip("[]"))
    except (UnicodeDecodeError, ValueError):
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, str(address), port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, str(address), port, timeout=timeout)


def upstream_endpoint(
    reactor: IReactorTCP, host: bytes, port: int, timeout: float, tls_policy: IPolicyForHTTPS | None = None
) -> IStreamClientEndpoint:
    """
    The endpoint of one upstream: TCP, wrapped in TLS when ``tls_policy`` (an
    ``IPolicyForHTTPS``) is given, which makes the connection creator for the
    host and port (certificate and host name checks).
    """
    endpoint = tcp_endpoint(reactor, host, port, timeout)
    if tls_policy is not None:
        endpoint = wrapClientTLS(tls_policy.creatorForNetloc(host, port), endpoint)
    return endpoint


@implementer(IUpstreamConnector)
class EndpointConnector:
    """
    The WebSocket relay's connector: connects a per-handshake upstream factory
    (Autobahn's ``WebSocketClientFactory``) over TCP, or TLS for ``wss://``
    with ``tls_policy`` (by default the system trust store verifies the
    certificate and host name); fires with the upstream leg.
    """

    def __init__(self, reactor: IReactorTCP, timeout: float, tls_policy: IPolicyForHTTPS | None = None) -> None:
        """``reactor`` connects and times the connects out."""
        self.reactor, self.timeout = reactor, timeout
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        #: plain TCP endpoints by (host, port): an endpoint holds no connection,
        #: and building one parses the host (an IP literal or not) every time
        self.plain: dict[tuple[str, int], IStreamClientEndpoint] = {}

    def connect(self, factory: WebSocketClientFactory) -> Deferred[IProtocol]:
        key = (factory.host, factory.port)
        endpoint = None if factory.isSecure else self.plain.get(key)
        if endpoint is None:
            tls = self.tls_policy if factory.isSecure else None
            endpoint = upstream_endpoint(self.reactor, factory.host.encode("idna"), factory.port, self.timeout, tls)
            if tls is None:
                self.plain[key] = endpoint
        return endpoint.connect(factory)

