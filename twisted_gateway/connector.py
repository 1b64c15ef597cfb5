"""
How the gateway reaches an upstream, shared by the HTTP forwarder
(``http_proxy.UpstreamEndpoints``) and the WebSocket relay
(:func:`endpoint_connector`): TCP, with TLS for https and wss.
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

#: Connects one upstream WebSocket leg's factory; fires with the leg.
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


def endpoint_connector(reactor: IReactorTCP, timeout: float, tls_policy: IPolicyForHTTPS | None = None) -> Connector:
    """
    The WebSocket relay's connector: connects a per-handshake upstream factory
    (Autobahn's ``WebSocketClientFactory``) over TCP, or TLS for ``wss://``
    with ``tls_policy`` (by default the system trust store verifies the
    certificate and host name); fires with the upstream leg.
    """
    policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
    #: plain TCP endpoints by (host, port): an endpoint holds no connection,
    #: and building one parses the host (an IP literal or not) every time
    plain: dict[tuple[str, int], IStreamClientEndpoint] = {}

    def connect(factory: WebSocketClientFactory) -> Deferred[IProtocol]:
        key = (factory.host, factory.port)
        endpoint = None if factory.isSecure else plain.get(key)
        if endpoint is None:
            tls = policy if factory.isSecure else None
            endpoint = upstream_endpoint(reactor, factory.host.encode("idna"), factory.port, timeout, tls)
            if tls is None:
                plain[key] = endpoint
        return endpoint.connect(factory)

    return connect
