"""
The gateway's parts and their lifetime (``gateway.py``) in memory: the real
parts provide the interfaces they can be replaced through, fakes of those
interfaces are used where given, and stopping the gateway leaves nothing
running.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_gateway.auth import Authenticator
from twisted_gateway.config import parse_config
from twisted_gateway.connector import UpstreamConnector
from twisted_gateway.gateway import build_gateway
from twisted_gateway.http_proxy import HTTPForwarder
from twisted_gateway.identity import Identity
from twisted_gateway.interfaces import IAuthenticator, IHTTPForwarder, IUpstreamConnector
from twisted_gateway.resource import build_gateway_resource
from twisted_gateway.testing import MemoryNetwork, RecordingUpstream

CONFIG = """
[gateway]
ws_ping_interval = 10

[auth]
secret = a-secret-long-enough-for-hs256-keys-0123456789
algorithms = HS256

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:9001
health_check = /health
health_interval = 5
"""


@implementer(IHTTPForwarder)
class ClosingForwarder:
    """A forwarder that answers every request itself and records its close."""

    def __init__(self) -> None:
        self.closed = False

    def forward(self, request: Any, upstream: Any, path: bytes, query: bytes, **_: Any) -> int:
        request.write(b"forwarded " + path)
        request.finish()
        return NOT_DONE_YET

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(IAuthenticator)
class StartedAuthenticator:
    """An authenticator that lets everyone in, not ready until started."""

    def __init__(self) -> None:
        self.started = False

    async def authenticate(self, mode: str, headers: Any, query: bytes, route: Any) -> Identity | None:
        return Identity("alice", {"sub": "alice"})

    def upstream_query(self, query: bytes) -> bytes:
        return query

    def ready(self) -> bool:
        return self.started

    def key_counts(self) -> tuple[int, dict[str, int]]:
        return 0, {}

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.started = False
        return succeed(None)


def _get(resource: Any, clock: MemoryReactorClock, path: bytes) -> tuple[int, bytes]:
    """One GET through a Site; the status and body."""
    channel = Site(resource, reactor=clock).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    channel.connectionLost(Failure(ConnectionError()))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_the_real_parts_provide_the_interfaces_they_are_replaced_through():
    """What ``build_gateway`` picks passes ``verifyObject`` for its interface."""
    settings = parse_config(CONFIG)
    clock = MemoryReactorClock()
    gateway = build_gateway(settings, clock)
    assert verifyObject(IService, gateway)
    assert verifyObject(IHTTPForwarder, gateway.forwarder)
    assert verifyObject(IUpstreamConnector, gateway.connector)
    assert verifyObject(IAuthenticator, gateway.authenticator)
    assert isinstance(gateway.forwarder, HTTPForwarder)
    assert isinstance(gateway.connector, UpstreamConnector)
    assert verifyObject(IAuthenticator, Authenticator(settings.auth, clock))
    assert verifyObject(IUpstreamConnector, MemoryNetwork().connector(RecordingUpstream()))


def test_given_parts_are_used_and_stopping_the_gateway_stops_everything_it_started():
    """
    A forwarder and an authenticator given to ``build_gateway`` serve the
    routes and ``/readyz``; the stop closes the forwarder, stops the
    authenticator, the pings and the health checks: no timer is left.
    """
    clock = MemoryReactorClock()
    forwarder, authenticator = ClosingForwarder(), StartedAuthenticator()
    resource = build_gateway_resource(
        parse_config(CONFIG), clock, forwarder=forwarder, authenticator=authenticator
    )
    gateway = resource.gateway
    assert _get(resource, clock, b"/readyz")[0] == 503  # the authenticator is not started yet
    gateway.startService()
    assert authenticator.started and clock.getDelayedCalls()
    for instance in gateway.pools["chat"].instances:
        instance.record_check(True, "")
    assert _get(resource, clock, b"/readyz")[0] == 200
    status, body = _get(resource, clock, b"/v1/chat/hello")
    assert status == 200 and b"forwarded /v1/chat/hello" in body
    stopped = gateway.stopService()
    assert stopped.called
    assert forwarder.closed and not authenticator.started
    assert [call for call in clock.getDelayedCalls() if call.active()] == []
