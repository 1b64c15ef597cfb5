"""
The WebSocket relay in memory, for this package's tests and for library users
(as ``treq.testing`` is for treq): a gateway whose client and upstream
connections are ``twisted.test.iosim`` pumps on a ``MemoryReactorClock``, so
pairing, closes, expiry, pings and backpressure are tested without sockets or
real time.

    net = MemoryRelay(config_text, Upstream())
    client = net.client("/v1/chat/ws")   # raw bytes, after the handshake
    client.send(frame(OP_TEXT, b"hi", mask=b"abcd"))
    net.flush()
    client.received                       # the frames the gateway sent back
"""

from __future__ import annotations

import base64
import os
import struct
from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from twisted_gateway._bases import WebSocketServerFactory, WebSocketServerProtocol, WrappingFactory
from twisted_gateway._compat import timers_on
from twisted_gateway.interfaces import IAuthenticator, IHTTPForwarder, IUpstreamConnector
from twisted_gateway.ws_passthrough import unmask
from twisted_gateway.ws_relay import RelayRegistry

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    """One WebSocket frame (``mask``: the 4-byte key a client frame carries)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + unmask(payload, mask)


def parse_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Complete frames in ``data`` as (opcode, fin, payload unmasked), and what is left."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        n = b1 & 0x7F
        start = i + 2
        if n == 126:
            if start + 2 > len(data):
                break
            n = struct.unpack("!H", data[start : start + 2])[0]
            start += 2
        elif n == 127:
            if start + 8 > len(data):
                break
            n = struct.unpack("!Q", data[start : start + 8])[0]
            start += 8
        key = None
        if b1 & 0x80:
            key = data[start : start + 4]
            start += 4
        if start + n > len(data):
            break
        payload = data[start : start + n]
        if key is not None:
            payload = unmask(payload, key)
        frames.append((b0 & 0x0F, bool(b0 & 0x80), payload))
        i = start + n
    return frames, data[i:]


def close_code(payload: bytes) -> int | None:
    """The code of a close frame's payload (None without one)."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


class MemoryNetwork:
    """The in-memory connections of one test; :meth:`flush` delivers until nothing moves."""

    def __init__(self, clock: MemoryReactorClock | None = None) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.pumps: list[IOPump] = []

    def join(self, server: IProtocol, client: IProtocol, *, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> IOPump:
        """Connect two protocols (accepting and initiating) through a pump."""
        server_transport = FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", *peer))
        client_transport = FakeTransport(client, isServer=False)
        pump: IOPump = connect(server, server_transport, client, client_transport, greet=False)
        self.pumps.append(pump)
        return pump

    def flush(self, rounds: int = 1000) -> None:
        """Deliver bytes (and the clock's due calls) until no pump moves any."""
        for _ in range(rounds):
            self.clock.advance(0)
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                return

    def connector(self, upstream: WebSocketServerFactory) -> MemoryConnector:
        """An upstream connector (``build_gateway(connector=...)``) reaching ``upstream`` in memory."""
        return MemoryConnector(self, upstream)


@implementer(IUpstreamConnector)
class MemoryConnector:
    """Connects the relay's upstream legs to one upstream factory over a :class:`MemoryNetwork`."""

    def __init__(self, net: MemoryNetwork, upstream: WebSocketServerFactory) -> None:
        self.net, self.upstream = net, upstream

    def connect(self, factory: WebSocketClientFactory) -> Deferred[IProtocol]:
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", factory.port))
        server = self.upstream.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert client is not None and server is not None
        self.net.join(server, client)
        return succeed(client)


class RawClient(Protocol):
    """A client that writes bytes as given and keeps every byte it reads."""

    def __init__(self) -> None:
        self.buffer = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None, "not connected"
        self.transport.write(data)

    @property
    def head(self) -> bytes:
        """The handshake answer (up to the blank line)."""
        return self.buffer.split(b"\r\n\r\n", 1)[0]

    @property
    def frames(self) -> list[tuple[int, bool, bytes]]:
        """The frames read after the handshake answer."""
        return parse_frames(self.buffer.split(b"\r\n\r\n", 1)[1])[0] if b"\r\n\r\n" in self.buffer else []


class RecordingUpstreamProtocol(WebSocketServerProtocol):
    """An upstream leg that records messages and closes; echoes when its factory says so."""

    def onConnect(self, request: ConnectionRequest) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        #: (code, reason) of the close frame it received, and of its onClose
        self.close_received: tuple[int | None, str | None] | None = None
        self.close: tuple[int | None, str | None] | None = None
        self.factory.connections.append(self)
        return None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))
        if self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        from twisted_gateway.ws_relay import _accept_close_frame

        if self.close_received is None:
            self.close_received = (code, reasonRaw.decode("utf-8", "replace") if reasonRaw is not None else None)
        accepted: bool | None = _accept_close_frame(self, code, reasonRaw)  # 1014 too, as the gateway accepts it
        return accepted

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close = (code, reason)


class RecordingUpstream(WebSocketServerFactory):
    """An Autobahn upstream in memory that records its connections."""

    protocol = RecordingUpstreamProtocol
    noisy = False

    def __init__(self, *, echo: bool = True, **options: object) -> None:
        super().__init__()
        self.echo = echo
        self.connections: list[RecordingUpstreamProtocol] = []
        self.setProtocolOptions(failByDrop=False, **options)


class MemoryRelay:
    """
    A gateway (``settings`` parsed from ``config``) whose upstream connections
    reach ``upstream`` in memory, on one ``MemoryReactorClock``; ``forwarder``
    and ``authenticator`` replace those parts (as :func:`build_gateway`'s keywords).
    """

    def __init__(
        self,
        config: str,
        upstream: WebSocketServerFactory | None = None,
        *,
        forwarder: IHTTPForwarder | None = None,
        authenticator: IAuthenticator | None = None,
    ) -> None:
        from twisted_gateway.config import parse_config
        from twisted_gateway.gateway import build_gateway
        from twisted_gateway.resource import GatewayResource
        from twisted_gateway.site import build_site

        self.net = MemoryNetwork()
        self.clock: IReactorTime = self.net.clock
        self.upstream = upstream if upstream is not None else RecordingUpstream()
        timers_on(self.upstream, self.clock)
        self.settings = parse_config(config)
        self.gateway = build_gateway(
            self.settings, self.net.clock, connector=self.net.connector(self.upstream),
            forwarder=forwarder, authenticator=authenticator,
        )
        self.gateway.startService()
        self.resource = GatewayResource(self.gateway)
        site = build_site(self.resource, self.settings, reactor=self.clock)
        # hand_over moves a wrapped channel's connection to the relay, as under TLS
        self.site = WrappingFactory(site)

    @property
    def registry(self) -> RelayRegistry:
        return self.gateway.registry

    def flush(self) -> None:
        self.net.flush()

    def client(self, path: str, headers: dict[str, str] | None = None, *, peer: str = "127.0.0.1") -> RawClient:
        """A raw client that sent the upgrade for ``path`` (pumped until answered)."""
        client = RawClient()
        server = self.site.buildProtocol(IPv4Address("TCP", peer, 40000))
        self.net.join(server, client, peer=(peer, 40000))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            "Host: gateway.test",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.flush()
        return client

    def stop(self) -> Deferred[None]:
        """Stop the gateway's timers and connections."""
        d = self.gateway.stopService()
        self.flush()
        return d
