"""Real peers for loopback tests: Autobahn upstreams and clients, listeners, a gateway."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from twisted_gateway.config import parse_config
from twisted_gateway.resource import GatewayResource
from twisted_gateway.ws_relay import _accept_close_frame

LOOPBACK = "tcp:0:interface=127.0.0.1"


async def listen(factory: Any) -> Any:
    return await serverFromString(reactor, LOOPBACK).listen(factory)


class _Inbox:
    """Messages and the close of one WebSocket endpoint, awaitable in order."""

    def _init_inbox(self) -> None:
        self.messages: deque = deque()
        self._waiting: deque[Deferred] = deque()
        self.closed: Deferred = Deferred()
        self.opened: Deferred = Deferred()

    def _deliver(self, item) -> None:
        if self._waiting:
            self._waiting.popleft().callback(item)
        else:
            self.messages.append(item)

    def next_message(self) -> Deferred:
        if self.messages:
            d = Deferred()
            d.callback(self.messages.popleft())
            return d
        d = Deferred()
        self._waiting.append(d)
        return d

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._deliver((payload, isBinary))

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onCloseFrame(self, code, reasonRaw):
        # Like browsers, accept 1014 (Bad Gateway), which Autobahn does not know.
        return _accept_close_frame(self, code, reasonRaw)

    def onClose(self, wasClean, code, reason) -> None:
        if not self.closed.called:
            self.closed.callback((code, reason))


class UpstreamProtocol(_Inbox, WebSocketServerProtocol):
    """An upstream that records handshakes and messages; echoes when ``echo`` is set."""

    def onConnect(self, request):
        self._init_inbox()
        self.request = request
        self.factory.handshakes.append(request)
        if self.factory.refuse:
            raise ConnectionDeny(*self.factory.refuse)
        self.factory.open_protocols.add(self)
        self.factory.connected.append(self)
        for waiter in self.factory._connect_waiters:
            waiter.callback(self)
        self.factory._connect_waiters = []
        chosen = self.factory.choose_protocol(request.protocols)
        return chosen

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.echo:
            self.sendMessage(payload, isBinary)
        else:
            super().onMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason) -> None:
        self.factory.open_protocols.discard(self)
        if hasattr(self, "closed"):
            super().onClose(wasClean, code, reason)


class Upstream(WebSocketServerFactory):
    """An Autobahn upstream whose open connections are counted."""

    protocol = UpstreamProtocol
    noisy = False

    def __init__(self, *, echo: bool = True, refuse=None, subprotocol: str | None = None, **options):
        super().__init__()
        self.echo, self.refuse, self.subprotocol = echo, refuse, subprotocol
        self.handshakes: list = []
        self.connected: list = []
        self.open_protocols: set = set()
        self._connect_waiters: list[Deferred] = []
        # setProtocolOptions resets allowNullOrigin to False unless told otherwise
        self.setProtocolOptions(**{"allowNullOrigin": True, **options})

    def choose_protocol(self, offered):
        return self.subprotocol if self.subprotocol in offered else None

    def next_connection(self) -> Deferred:
        d = Deferred()
        self._connect_waiters.append(d)
        return d


class ClientProtocol(_Inbox, WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self._init_inbox()

    def onConnect(self, response) -> None:
        self.response = response

    def onClose(self, wasClean, code, reason) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {reason}"))
        super().onClose(wasClean, code, reason)


async def ws_connect(url: str, *, protocols=None, headers=None, **options) -> ClientProtocol:
    """Open an Autobahn client connection; returns the protocol once open."""
    factory = WebSocketClientFactory(url, protocols=protocols or [], headers=headers or {}, useragent=None)
    factory.protocol = ClientProtocol
    factory.noisy = False
    factory.setProtocolOptions(**options)
    endpoint = TCP4ClientEndpoint(reactor, factory.host, factory.port)
    proto = await endpoint.connect(factory)
    await proto.opened
    return proto


class Gateway:
    """A gateway resource tree served on a loopback port."""

    def __init__(self, port: Any, resource: GatewayResource) -> None:
        self.port, self.resource = port, resource
        self.number = port.getHost().port

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.number}{path}"

    @property
    def registry(self):
        return self.resource.registry

    async def close(self) -> None:
        await self.port.stopListening()


async def start_gateway(config: str, **kwargs) -> Gateway:
    settings = parse_config(config)
    resource = GatewayResource(settings, reactor=reactor, **kwargs)
    site = Site(resource)
    site.noisy = False
    return Gateway(await listen(site), resource)


def route_config(upstream_port: int, extra_gateway: str = "", extra_route: str = "") -> str:
    return f"""
[gateway]
ws_open_timeout = 5
{extra_gateway}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
{extra_route}
"""


class RawClient(Protocol):
    """A raw TCP client: whatever bytes the test writes, everything it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred = Deferred()
        self._waiters: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiters):
            if marker in self.received:
                self._waiters.remove((marker, d))
                d.callback(self.received)

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.received)
        for _, d in self._waiters:
            if not d.called:
                d.callback(self.received)

    def wait_for(self, marker: bytes) -> Deferred:
        d = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self._waiters.append((marker, d))
        return d


async def raw_connect(port: int) -> RawClient:
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(RawClient)
    )


def http_error(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of a raw HTTP error response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)
