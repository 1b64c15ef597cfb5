"""
``request_buffering = off`` on loopback: the upstream gets the request as soon
as its head is read and the body as it arrives, answers ``Expect:
100-continue`` itself, and ``max_body_size`` still ends a body with 413.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from twisted_gateway.config import parse_config
from twisted_gateway.resource import build_gateway_resource
from twisted_gateway.site import build_site
from tests.support import listen, raw_connect, settle


class Upstream(Protocol):
    """A socket-level upstream: keeps what it got; ``answer(self)`` decides what to write."""

    def connectionMade(self) -> None:
        self.received = b""
        self.lost = False
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.answer(self)

    def connectionLost(self, reason) -> None:
        self.lost = True

    @property
    def body(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[2]


def upstream_factory(answer) -> Factory:
    factory = Factory.forProtocol(Upstream)
    factory.connections = []
    factory.answer = answer
    return factory


async def start(upstream_port: int, buffering: str = "off", max_body_size: int = 10485760):
    settings = parse_config(
        f"""
[gateway]
max_body_size = {max_body_size}
[route:upload]
prefix = /upload
upstream = http://127.0.0.1:{upstream_port}
request_buffering = {buffering}
"""
    )
    resource = build_gateway_resource(settings, reactor)
    return await listen(build_site(resource, settings)), resource.gateway


async def through(answer, **settings):
    """An upstream answering with ``answer``, a gateway in front of it, and a client connected."""
    upstream = await listen(upstream_factory(answer))
    port, gateway = await start(upstream.getHost().port, **settings)
    client = await raw_connect(port.getHost().port)
    return upstream, port, gateway, client


async def stop(port, gateway, upstream) -> None:
    await gateway.stopService()
    await port.stopListening()
    await upstream.stopListening()


def head(length: bytes = b"Content-Length: 300000", *extra: bytes) -> bytes:
    lines = [b"POST /upload/file HTTP/1.1", b"Host: chat.example.com", length, *extra, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def answer_when_complete(size: int):
    def answer(up: Upstream) -> None:
        if len(up.body) >= size:
            up.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(size)), size))
            up.transport.loseConnection()

    return answer


@pytest_twisted.ensureDeferred
async def test_the_upstream_sees_a_streamed_upload_before_its_last_byte_is_sent():
    """The head and the first 100 kB are upstream while the client still holds the rest."""
    upstream, port, gateway, client = await through(answer_when_complete(300000))
    try:
        client.transport.write(head() + b"a" * 100000)
        await settle(lambda: upstream.factory.connections and len(upstream.factory.connections[0].body) == 100000,
                     "the first 100 kB upstream")
        up = upstream.factory.connections[0]
        assert up.received.startswith(b"POST /upload/file HTTP/1.1\r\n")
        assert client.received == b""  # no answer yet: the upstream has not seen it all
        client.transport.write(b"b" * 200000)
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\n300000")
        assert up.body == b"a" * 100000 + b"b" * 200000
    finally:
        await stop(port, gateway, upstream)


@pytest_twisted.ensureDeferred
async def test_a_chunked_upload_is_streamed_chunked():
    upstream, port, gateway, client = await through(lambda up: up.body.endswith(b"0\r\n\r\n") and (
        up.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n"), up.transport.loseConnection()))
    try:
        client.transport.write(head(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n")
        await settle(lambda: upstream.factory.connections and b"hello" in upstream.factory.connections[0].body,
                     "the first chunk upstream")
        client.transport.write(b"6\r\n world\r\n0\r\n\r\n")
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 204")
    finally:
        await stop(port, gateway, upstream)


@pytest_twisted.ensureDeferred
async def test_expect_continue_is_the_upstreams_to_refuse():
    """An upstream that refuses a 100-continue upload answers before a byte of the body was sent."""

    def refuse(up: Upstream) -> None:
        if b"\r\n\r\n" in up.received:
            up.transport.write(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n")
            up.transport.loseConnection()

    upstream, port, gateway, client = await through(refuse)
    try:
        client.transport.write(head(b"Content-Length: 1000000", b"Expect: 100-continue"))
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer
        assert b"WWW-Authenticate: Bearer" in answer and b"100 Continue" not in answer
        assert b"\r\nExpect: 100-continue\r\n" in upstream.factory.connections[0].received
    finally:
        await stop(port, gateway, upstream)


@pytest_twisted.ensureDeferred
async def test_expect_continue_is_relayed_from_the_upstream():
    """The client's 100 Continue is the upstream's, and the body follows it."""

    def accept(up: Upstream) -> None:
        if b"\r\n\r\n" in up.received and not getattr(up, "continued", False):
            up.continued = True
            up.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(up.body) == 10:
            up.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            up.transport.loseConnection()

    upstream, port, gateway, client = await through(accept)
    try:
        client.transport.write(head(b"Content-Length: 10", b"Expect: 100-continue"))
        await client.wait_for(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.transport.write(b"0123456789")
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), answer
        assert upstream.factory.connections[0].body == b"0123456789"
    finally:
        await stop(port, gateway, upstream)


@pytest_twisted.ensureDeferred
async def test_a_streamed_body_past_max_body_size_ends_with_413():
    """The upstream request ends the moment the limit is passed; the upstream is not blamed."""
    upstream, port, gateway, client = await through(lambda up: None, max_body_size=1000)
    try:
        client.transport.write(head(b"Transfer-Encoding: chunked") + b"200\r\n" + b"x" * 512 + b"\r\n")
        await settle(lambda: upstream.factory.connections and b"x" * 512 in upstream.factory.connections[0].body,
                     "the first chunk upstream")
        client.transport.write(b"200\r\n" + b"y" * 512 + b"\r\n")
        answer = await client.wait_for(b"}\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        await settle(lambda: upstream.factory.connections[0].lost, "the upstream request ended")
        assert gateway.pools["upload"].instances[0].failures == 0
        client.transport.loseConnection()
        await client.lost
    finally:
        await stop(port, gateway, upstream)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_stops_reading_stops_the_gateway_reading_the_client():
    """Backpressure: the gateway holds no more than socket buffers while the upstream is slow."""
    size = 16 * 1024 * 1024

    def slow(up: Upstream) -> None:
        if not getattr(up, "paused", False):
            up.paused = True
            up.transport.pauseProducing()
        if len(up.body) == size:
            up.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            up.transport.loseConnection()

    upstream, port, gateway, client = await through(slow, max_body_size=size)
    site = port.factory
    try:
        client.transport.write(head(b"Content-Length: %d" % size) + b"z" * size)

        def client_paused() -> bool:
            """The gateway stopped reading the client's connection (not read by the reactor)."""
            channels = list(site.client_connections)
            return bool(channels) and channels[0].transport not in reactor.getReaders()

        await settle(client_paused, "the client paused by the gateway")
        up = upstream.factory.connections[0]
        assert len(up.body) < size
        up.transport.resumeProducing()
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:100]
        assert len(up.body) == size
    finally:
        await stop(port, gateway, upstream)
