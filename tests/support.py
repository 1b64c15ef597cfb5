"""Real peers for loopback tests: Autobahn upstreams and clients, listeners, a gateway."""

from __future__ import annotations

import gc
import inspect
import json
import os
import struct
import time
from collections import deque
from typing import Any, Awaitable, Callable

import pytest_twisted

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor, task, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web.server import Site

from twisted_gateway.config import Settings, parse_config
from twisted_gateway.gateway import build_gateway
from twisted_gateway.resource import GatewayResource, build_gateway_resource
from twisted_gateway.service import GatewayService
from twisted_gateway.testing import frame
from twisted_gateway.ws_relay import _accept_close_frame

LOOPBACK = "tcp:0:interface=127.0.0.1"

#: An opening handshake as Firefox sends it (``Connection: keep-alive, Upgrade``).
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


#: How long a wait may last before it counts as a hang: a guard, never a speed expectation.
GUARD = 15.0


async def settle(condition: Callable[[], Any], what: str = "condition", seconds: float = GUARD) -> Any:
    """
    Wait, turning the reactor, until ``condition()`` (plain or awaitable) is
    true, and return what it gave; ``seconds`` guards against a hang.
    """
    deadline = time.monotonic() + seconds
    while True:
        holds = condition()
        if inspect.isawaitable(holds):
            holds = await holds
        if holds:
            return holds
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {seconds:g} s")
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.async_yield_fixture
async def later():
    """``later(stop)`` registers an async clean-up; they run last-in, first-out."""
    stops: list[Callable[[], Awaitable[Any]]] = []
    yield stops.append
    for stop in reversed(stops):
        await stop()


async def start_service(later: Callable[[Callable[[], Awaitable[Any]]], None], settings: Settings) -> tuple[GatewayService, int]:
    """A GatewayService of ``settings`` started (``later`` stops it): it and its first listener's port."""
    service = GatewayService(build_gateway(settings, reactor), reactor)
    service.privilegedStartService()
    service.startService()
    later(service.stopService)
    port = await service.listeners[0].when_listening()
    return service, port.getHost().port


class LogEvents:
    """Log events of one namespace, collected while the test runs."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def __enter__(self) -> LogEvents:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)


def selectables() -> set[Any]:
    """Every listener and connection on the reactor."""
    return set(reactor.getReaders()) | set(reactor.getWriters())


def connections_to(port: int) -> list[tcp.Client]:
    """This process's outgoing connections to ``port``, as the reactor holds them."""
    return [s for s in selectables() if isinstance(s, tcp.Client) and s.getPeer().port == port]


def process_alive(pid: int) -> bool:
    """Whether a process of that id still exists (a zombie counts until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def settle_blocking(condition: Callable[[], Any], what: str = "condition", seconds: float = 2 * GUARD) -> Any:
    """``settle`` for tests that drive processes without the reactor: polls with ``time.sleep``."""
    deadline = time.monotonic() + seconds
    while not (holds := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {seconds:g} s")
        time.sleep(0.05)
    return holds


async def left_to_the_collector(action: Callable[[], Awaitable[Any]]) -> set[str]:
    """
    The gateway's types (``twisted_gateway``'s) of what ``action`` leaves in
    reference cycles, freed only when the cycle collector next runs (whose
    passes, under load, grow with what waits for them). What was alive before
    is held through it, so that only what ``action`` makes is judged (an
    earlier test's gateway ends when its last timer or connection does).
    """
    gc.collect()
    earlier = [o for o in gc.get_objects() if str(type(o).__module__).startswith("twisted_gateway.")]
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await action()
        gc.collect()
        return {type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("twisted_gateway.")}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        del earlier


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
    """A gateway's resource tree served on a loopback port (its background work not started)."""

    def __init__(self, port: Any, resource: GatewayResource) -> None:
        self.port, self.resource, self.gateway = port, resource, resource.gateway
        self.number = port.getHost().port

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.number}{path}"

    @property
    def registry(self):
        return self.gateway.registry

    async def close(self) -> None:
        await self.port.stopListening()


async def start_gateway(config: str, **parts) -> Gateway:
    """A gateway for ``config`` listening on loopback; ``parts`` replace real ones (``build_gateway``)."""
    resource = build_gateway_resource(parse_config(config), reactor, **parts)
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


def hs256_config(secret: str, upstream_port: int, *, before: str = "", route: str = "", after: str = "") -> str:
    """
    A gateway that takes HS256 tokens signed with ``secret`` (no leeway) on its
    chat route to ``upstream_port``: ``before`` holds the sections ahead of
    [auth], ``route`` more keys of [route:chat], ``after`` the sections behind it.
    """
    return f"""{before}
[auth]
algorithms = HS256
secret = {secret}
leeway = 0
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
{route}
{after}"""


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


def parse_response(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bool]:
    """Status, reason, headers, body and whether the body was complete."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    _, code, reason = (lines[0].split(b" ", 2) + [b""])[:3]
    headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
    names = {name.lower(): value for name, value in headers}
    if names.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return int(code), reason, headers, body, False
            size = int(size_line, 16)
            if size == 0:
                return int(code), reason, headers, body, True
            body, rest = body + rest[:size], rest[size + 2 :]
    if b"content-length" in names:
        length = int(names[b"content-length"])
        return int(code), reason, headers, rest[:length], len(rest) >= length
    return int(code), reason, headers, rest, True


def echo_answer(request: Any, **fields: Any) -> bytes:
    """An echo upstream's JSON answer: the request's method, URI and headers, and ``fields``."""
    request.setHeader(b"content-type", b"application/json")
    headers = [[k.decode().lower(), v.decode()] for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
    return json.dumps({"method": request.method.decode(), "uri": request.uri.decode(), "headers": headers, **fields}).encode()


def http_error(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of a raw HTTP error response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def open_relay(upstream: Upstream | None = None, gateway_extra: str = ""):
    """An upstream (an echoing one by default) behind a gateway's ``/v1/chat`` route."""
    upstream = upstream or Upstream()
    up_port = await listen(upstream)
    gw = await start_gateway(route_config(up_port.getHost().port, gateway_extra))
    return upstream, up_port, gw


async def close_relay(gw: Gateway, up_port: Any, *clients) -> None:
    """Drop the clients, wait until the gateway holds no pair, stop both listeners."""
    for c in clients:
        if c.state != WebSocketProtocol.STATE_CLOSED:
            c.dropConnection(abort=True)
    await settle(lambda: len(gw.registry) == 0 and not gw.registry.handshakes, "no pair left")
    await gw.close()
    await up_port.stopListening()


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\x0f\x1e\x2d\x3c"
) -> bytes:
    """One frame as a browser writes it (``mask=None``: unmasked, which no client may send)."""
    return frame(opcode, payload, fin=fin, rsv=rsv, mask=mask)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames a server wrote after its 101."""
    data = data.partition(b"\r\n\r\n")[2]
    frames = []
    while len(data) >= 2:
        n, start = data[1] & 0x7F, 2
        if n == 126:
            n, start = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, start = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((data[0] & 0x0F, data[start : start + n]))
        data = data[start + n :]
    return frames
