"""
What an upstream sees through the gateway, compared with a direct connection:
the client's ``Host`` (or the route's ``host_header``), redirects that never
name an internal address, and a WebSocket handshake with nothing added and
the compression offer as the client wrote it.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from autobahn.websocket.compress import PerMessageDeflateOfferAccept
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_gateway.refusals import MAX_REFUSAL_BODY

from tests.support import (
    Upstream,
    listen,
    raw_connect,
    route_config,
    settle,
    start_gateway,
)


class HostEcho(Resource):
    """Answers with the Host it got; ``/v1/chat/old`` redirects as frameworks do, from Host."""

    isLeaf = True

    def render(self, request):
        host = request.getHeader(b"host")
        if request.path == b"/v1/chat/old":
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://" + host + b"/v1/chat/new?q=1")
            request.setHeader(b"refresh", b"0; url=http://" + host + b"/v1/chat/new")
            return b""
        return json.dumps({"host": host.decode()}).encode()


async def http_get(port: int, path: str, host: bytes = b"chat.example.com") -> tuple[bytes, bytes]:
    client = await raw_connect(port)
    client.transport.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    )
    raw = await client.lost
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "host_header, seen",
    [("client", "chat.example.com"), ("upstream", None), ("internal.example:8080", "internal.example:8080")],
)
async def test_http_upstream_gets_the_routes_host_and_redirects_name_the_client(host_header, seen):
    """The upstream's Host follows host_header; its redirects never send the client inside."""
    up = await listen(Site(HostEcho()))
    own = f"127.0.0.1:{up.getHost().port}"
    gw = await start_gateway(route_config(up.getHost().port, extra_route=f"host_header = {host_header}"))
    try:
        _, body = await http_get(gw.number, "/v1/chat/x")
        assert json.loads(body)["host"] == (seen or own)
        head, _ = await http_get(gw.number, "/v1/chat/old")
        assert head.startswith(b"HTTP/1.1 307")
        assert header(head, b"location") == b"http://chat.example.com/v1/chat/new?q=1"
        assert header(head, b"refresh") == b"0; url=http://chat.example.com/v1/chat/new"
    finally:
        await gw.gateway.stopService()
        await gw.close()
        await up.stopListening()


UPGRADE = (
    "GET /v1/chat/ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def accept_first(offers):
    return PerMessageDeflateOfferAccept(offers[0]) if offers else None


async def upgrade_through(host_header: str, extra: str = ""):
    """
    One upgrade through a gateway to an Autobahn upstream that accepts the
    first compression offer: the handshake the upstream got, the answer the
    client got, the upstream's port and the upstream's own answer.
    """
    upstream = Upstream(perMessageCompressionAccept=accept_first)
    up = await listen(upstream)
    gw = await start_gateway(route_config(up.getHost().port, extra_route=f"host_header = {host_header}"))
    client = await raw_connect(gw.number)
    try:
        client.transport.write(UPGRADE.format(extra=extra).encode())
        answer = await client.wait_for(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101"), answer
        await settle(lambda: upstream.handshakes, "the upstream's handshake")
        await settle(lambda: upstream.connected, "the upstream's answer")
        own = upstream.connected[0].http_response_data
        return upstream.handshakes[0], answer, up.getHost().port, own.encode() if isinstance(own, str) else own
    finally:
        client.transport.loseConnection()
        await client.lost
        await settle(lambda: not upstream.open_protocols and not gw.registry.pairs, "both legs closed")
        await gw.gateway.stopService()
        await gw.close()
        await up.stopListening()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host_header", ["client", "upstream", "internal.example"])
async def test_upgrade_carries_the_routes_host(host_header):
    request, _, port, _ = await upgrade_through(host_header)
    expected = {"client": "chat.example.com", "upstream": f"127.0.0.1:{port}"}.get(host_header, host_header)
    assert request.headers["host"] == expected
    assert request.headers["x-forwarded-host"] == "chat.example.com"


@pytest_twisted.ensureDeferred
async def test_upgrade_adds_no_headers_the_client_did_not_send():
    """No Pragma or Cache-Control of the gateway's own; the client's own ones pass."""
    request, _, _, _ = await upgrade_through("client")
    assert "pragma" not in request.headers and "cache-control" not in request.headers
    request, _, _, _ = await upgrade_through("client", "Pragma: no-cache\r\n")
    assert request.headers["pragma"] == "no-cache"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate;client_max_window_bits=12;server_no_context_takeover",
        "permessage-deflate; server_max_window_bits=10, permessage-deflate",
    ],
)
async def test_compression_offer_reaches_the_upstream_as_written(offer):
    """The upstream is offered the client's permessage-deflate, byte for byte."""
    request, answer, _, upstream_answer = await upgrade_through(
        "client", f"Sec-WebSocket-Extensions: {offer}\r\n"
    )
    assert request.headers["sec-websocket-extensions"] == offer
    # and the client is answered with what the upstream answered
    granted = header(upstream_answer, b"sec-websocket-extensions")
    assert granted and granted.startswith(b"permessage-deflate")
    assert header(answer, b"sec-websocket-extensions") == granted


@pytest_twisted.ensureDeferred
async def test_other_extensions_are_not_offered_upstream():
    request, _, _, _ = await upgrade_through(
        "client", "Sec-WebSocket-Extensions: x-webkit-deflate-frame, permessage-deflate\r\n"
    )
    assert request.headers["sec-websocket-extensions"] == "permessage-deflate"


class Refusing(Protocol):
    """An upstream that answers any upgrade with fixed bytes, then closes (or not)."""

    def __init__(self, answer: bytes, close: bool) -> None:
        self.answer, self.close, self.buffer = answer, close, b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.answer:
            self.transport.write(self.answer)
            self.answer = b""
            if self.close:
                self.transport.loseConnection()


BIG = b"z" * (MAX_REFUSAL_BODY + 1000)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "answer, close, expected",
    [
        (
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"chat\"\r\n"
            b"Content-Length: 7\r\nConnection: keep-alive\r\n\r\nwho?..!",
            False,
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"chat\"\r\n"
            b"Content-Length: 7\r\nConnection: close\r\n\r\nwho?..!",
        ),
        (
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nwait\r\n0\r\n\r\n",
            False,
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\n"
            b"Content-Length: 4\r\nConnection: close\r\n\r\nwait",
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Deny-Reason: banned\r\n\r\n"
            b'{"reason": "banned"}',
            True,
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Deny-Reason: banned\r\n"
            b'Content-Length: 20\r\nConnection: close\r\n\r\n{"reason": "banned"}',
        ),
        (
            b"HTTP/1.1 413 Too Big\r\n\r\n" + BIG,
            True,
            b"HTTP/1.1 413 Too Big\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % MAX_REFUSAL_BODY
            + BIG[:MAX_REFUSAL_BODY],
        ),
    ],
    ids=["401-length", "429-chunked", "403-close", "413-cut"],
)
async def test_upstream_refusals_reach_the_client_whole(answer, close, expected):
    """Status, reason, end-to-end headers and body of the upstream's refusal; one log line."""
    up = await listen(Factory.forProtocol(lambda: Refusing(answer, close)))
    gw = await start_gateway(route_config(up.getHost().port))
    client = await raw_connect(gw.number)
    try:
        with capturedLogs() as events:
            client.transport.write(UPGRADE.format(extra="").encode())
            received = await client.lost
            await settle(lambda: not gw.registry.handshakes, "the handshake's end")
        assert received == expected
        # the instance answered: not held against it
        assert gw.gateway.pools["chat"].instances[0].failures == 0
        lines = [(e.get("log_namespace"), e.get("log_format")) for e in events if e.get("log_level") >= LogLevel.info]
        assert lines == [("twisted_gateway.access", "websocket {route} {path} {peer} refused: {status} {detail}")]
    finally:
        await gw.gateway.stopService()
        await gw.close()
        await up.stopListening()


class Silent(Protocol):
    """An upstream that reads the request and never answers (a long poll held open)."""


@pytest_twisted.ensureDeferred
async def test_a_route_may_shorten_or_lengthen_request_timeout():
    """The route's request_timeout decides when a held request gets its 504, not the gateway's."""
    up = await listen(Factory.forProtocol(Silent))
    config = route_config(
        up.getHost().port, extra_gateway="request_timeout = 0.2", extra_route="request_timeout = 1.5"
    )
    gw = await start_gateway(config)
    try:
        started = reactor.seconds()
        head, _ = await http_get(gw.number, "/v1/chat/poll")
        assert head.startswith(b"HTTP/1.1 504")
        # not cut at the gateway's 0.2 s (a lower bound only: no speed limit is asserted)
        assert reactor.seconds() - started >= 1.5
    finally:
        await gw.gateway.stopService()
        await gw.close()
        await up.stopListening()
