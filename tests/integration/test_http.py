"""
The HTTP forwarder on loopback: a gateway ``Site`` forwarding every request to
real upstreams (twisted.web, aiohttp in a thread, and raw sockets for odd
answers), driven by real clients (treq, and raw sockets for odd requests).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ipaddress
import json
import socket
import threading

import pytest
import pytest_twisted
from aiohttp import web as aioweb
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from twisted_gateway.config import GatewaySettings
from twisted_gateway.errors import GatewayError, render_error
from twisted_gateway.http_proxy import GatewayRequest, HTTPForwarder
from twisted_gateway.routing import normalize_path, split_uri

from tests.support import connections_to, echo_answer, left_to_the_collector, parse_response, settle

GZIPPED = gzip.compress(b"hello gzip " * 200, mtime=0)


# -- raw HTTP/1.1 ---------------------------------------------------------------


def values(headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


class RawClient(Protocol):
    """A socket-level client: bytes out, everything received kept."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self._markers: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self._markers):
            if marker in self.data:
                self._markers.remove((marker, d))
                d.callback(None)

    def connectionLost(self, reason) -> None:
        self.closed.callback(bytes(self.data))
        for _, d in self._markers:
            d.errback(reason)
        self._markers = []

    def received(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if marker in self.data:
            d.callback(None)
        else:
            self._markers.append((marker, d))
        return d


async def raw_connect(port: int) -> RawClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` (which should ask for ``Connection: close``), read until closed."""
    client = await raw_connect(port)
    client.transport.write(data)
    return await client.closed.addTimeout(timeout, reactor)


# -- upstreams ------------------------------------------------------------------


@implementer(IPushProducer)
class Firehose:
    """Writes ``total`` bytes as fast as the connection lets it; counts pauses."""

    def __init__(self, request, total: int) -> None:
        self.request, self.remaining = request, total
        self.sent = 0
        self.paused = False
        self.stopped = False
        self._call = None
        request.setHeader(b"content-length", b"%d" % total)
        request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._call = None
        while self.remaining and not self.paused and not self.stopped:
            size = min(self.remaining, 65536)
            self.remaining -= size
            self.sent += size
            self.request.write(b"x" * size)
        if not self.remaining and not self.stopped:
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


class TwistedUpstream(Resource):
    """A twisted.web upstream; the first path segment picks the behaviour."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        self.lost: list = []
        self.arrived: Deferred[None] = Deferred()
        self.release: Deferred[None] = Deferred()
        self.firehoses: list[Firehose] = []

    def render(self, request):
        self.requests.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        kind = request.path.split(b"/")[1].decode() or "echo"
        return getattr(self, "answer_" + kind, self.answer_echo)(request)

    def answer_echo(self, request):
        body = request.content.read()
        return echo_answer(
            request,
            body_sha256=hashlib.sha256(body).hexdigest(),
            body_length=len(body),
            peer_port=request.getClientAddress().port,
        )

    def answer_gzip(self, request):
        seen = request.getHeader(b"accept-encoding") or b"none"
        request.setHeader(b"x-seen-accept-encoding", seen)
        request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-type", b"text/plain")
        return GZIPPED

    def answer_cookie(self, request):
        request.setHeader(b"x-seen-cookie", request.getHeader(b"cookie") or b"none")
        request.responseHeaders.addRawHeader(b"set-cookie", b"session=secret; Path=/")
        request.responseHeaders.addRawHeader(b"set-cookie", b"theme=dark; Path=/")
        return b"cookies"

    def answer_redirect(self, request):
        request.setResponseCode(302)
        request.setHeader(b"location", b"/elsewhere")
        return b"moved"

    def answer_status(self, request):
        code = int(request.path.split(b"/")[2])
        request.setResponseCode(code, b"Fine Thanks" if code == 299 else None)
        request.setHeader(b"etag", b'"v1"')
        return b"" if code in (204, 304) else b"status body"

    def answer_hang(self, request):
        self.arrived.callback(None)
        return NOT_DONE_YET

    def answer_stream(self, request):
        request.write(b"first chunk;")

        def second(_):
            if not self.lost:
                request.write(b"second chunk")
                request.finish()

        self.release.addCallback(second)
        return NOT_DONE_YET

    def answer_big(self, request):
        size = int(request.args.get(b"size", [b"1048576"])[0])
        self.firehoses.append(Firehose(request, size))
        return NOT_DONE_YET

    def answer_truncate(self, request):
        if b"chunked" not in request.uri:
            request.setHeader(b"content-length", b"100")
        request.write(b"0123456789")
        request.channel.transport.loseConnection()
        return NOT_DONE_YET


class AiohttpUpstream:
    """An aiohttp upstream on its own event loop in a thread: another HTTP stack."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        app = aioweb.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = aioweb.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = aioweb.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    async def _handle(self, request: aioweb.Request) -> aioweb.StreamResponse:
        kind = request.raw_path.split("/")[1].split("?")[0]
        if kind == "gzip":
            return aioweb.Response(
                body=GZIPPED,
                headers={
                    "Content-Encoding": "gzip",
                    "Content-Type": "text/plain",
                    "X-Seen-Accept-Encoding": request.headers.get("Accept-Encoding", "none"),
                },
            )
        if kind == "cookie":
            response = aioweb.Response(
                text="cookies", headers={"X-Seen-Cookie": request.headers.get("Cookie", "none")}
            )
            response.set_cookie("session", "secret", path="/")
            response.set_cookie("theme", "dark", path="/")
            return response
        body = await request.read()
        return aioweb.json_response(
            {
                "method": request.method,
                "uri": request.raw_path,
                "headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers],
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        )

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class CannedUpstream(Protocol):
    """A socket-level upstream: answers any request with fixed bytes, or resets."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        if self.answer is None:
            self.transport.abortConnection()
        else:
            self.transport.write(self.answer)
            self.transport.loseConnection()


class EarlyAnswer(Protocol):
    """A socket-level upstream that answers 413 after the head, reading no body."""

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in self.buffer:
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(b"HTTP/1.1 413 Not Here\r\nContent-Length: 5\r\n\r\nsorry")

    def connectionLost(self, reason) -> None:
        self.factory.lost += 1


async def listen(factory) -> object:
    return await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)


@pytest_twisted.async_yield_fixture
async def twisted_upstream():
    upstream = TwistedUpstream()
    port = await listen(Site(upstream))
    upstream.base = f"http://127.0.0.1:{port.getHost().port}"
    yield upstream
    await port.stopListening()


@pytest.fixture(scope="module")
def aiohttp_upstream():
    upstream = AiohttpUpstream()
    upstream.base = f"http://127.0.0.1:{upstream.port}"
    yield upstream
    upstream.stop()


@pytest.fixture(params=["twisted", "aiohttp"])
def any_upstream(request):
    """The base URL of each upstream stack in turn."""
    return request.getfixturevalue(f"{request.param}_upstream").base


async def canned_upstream(answer: bytes | None):
    port = await listen(Factory.forProtocol(lambda: CannedUpstream(answer)))
    return port, f"http://127.0.0.1:{port.getHost().port}"


# -- the gateway ----------------------------------------------------------------


class ForwardAll(Resource):
    """Every request, whatever its path, is forwarded to one upstream base URL."""

    isLeaf = True

    def __init__(self, forwarder: HTTPForwarder, base: str) -> None:
        super().__init__()
        self.forwarder, self.base = forwarder, base

    def render(self, request):
        try:
            path, query = split_uri(request.uri)
            path = normalize_path(path)
        except GatewayError as error:
            return render_error(request, error)
        return self.forwarder.forward(request, self.base, path, query, route_name="test")


class GatewayFactory:
    def __init__(self) -> None:
        self.running: list[tuple[object, HTTPForwarder]] = []

    async def __call__(self, base: str, **settings) -> "Gateway":
        config = GatewaySettings(**settings)
        forwarder = HTTPForwarder(config, reactor)
        site = Site(ForwardAll(forwarder, base))
        site.requestFactory = GatewayRequest.for_settings(config)
        port = await listen(site)
        self.running.append((port, forwarder))
        return Gateway(port.getHost().port, forwarder)

    async def close(self) -> None:
        for port, forwarder in self.running:
            await port.stopListening()
            await forwarder.close()


class Gateway:
    def __init__(self, port: int, forwarder: HTTPForwarder) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.forwarder = forwarder


@pytest_twisted.async_yield_fixture
async def gateway():
    """``await gateway(upstream_base, **settings)`` starts a gateway; all are stopped after."""
    factory = GatewayFactory()
    yield factory
    await factory.close()


@pytest_twisted.async_yield_fixture
async def client():
    """A treq client that does not keep connections (so nothing lingers)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


def get(path: str, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: gw.example", *headers]
    if b"Connection: close" not in headers:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- transparency ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_standard_methods_reach_the_upstream(gateway, twisted_upstream, client, method):
    """Each standard method is forwarded with its body, and the answer comes back."""
    gw = await gateway(twisted_upstream.base)
    response = await client.request(method, gw.url + "/echo/x", data=b"payload")
    seen = await response.json()
    assert response.code == 200
    assert seen["method"] == method
    assert seen["body_sha256"] == hashlib.sha256(b"payload").hexdigest()


@pytest_twisted.ensureDeferred
async def test_head_gets_the_upstream_length_and_no_body(gateway, twisted_upstream):
    """HEAD is forwarded; the client sees the upstream's Content-Length and no body."""
    gw = await gateway(twisted_upstream.base)
    raw = await raw_request(gw.port, get("/echo", method=b"HEAD"))
    head, _, after = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert int(values(parse_response(raw)[2], b"content-length")[0]) > 0
    assert after == b""
    assert twisted_upstream.requests[0].method == b"HEAD"


@pytest_twisted.ensureDeferred
async def test_unknown_methods_pass_as_is(gateway, any_upstream):
    """A token method the gateway has never heard of reaches the upstream unchanged."""
    gw = await gateway(any_upstream)
    for method in (b"PURGE", b"MKCOL"):
        raw = await raw_request(gw.port, get("/echo", method=method))
        assert json.loads(parse_response(raw)[3])["method"] == method.decode()


@pytest_twisted.ensureDeferred
async def test_method_case_is_kept(gateway, twisted_upstream):
    """Methods are case-sensitive: ``purge`` is not turned into ``PURGE``."""
    gw = await gateway(twisted_upstream.base)
    raw = await raw_request(gw.port, get("/echo", method=b"purge"))
    assert json.loads(parse_response(raw)[3])["method"] == "purge"


@pytest_twisted.ensureDeferred
async def test_path_is_normalised_but_stays_encoded_and_query_is_untouched(gateway, any_upstream):
    """``/a%2Fb`` stays ``/a%2Fb``; dot segments go; the query arrives byte for byte."""
    gw = await gateway(any_upstream)
    raw = await raw_request(gw.port, get("/echo/./x/../a%2Fb//c?q=%20+&q=2&empty=&flag"))
    assert json.loads(parse_response(raw)[3])["uri"] == "/echo/a%2Fb/c?q=%20+&q=2&empty=&flag"


@pytest_twisted.ensureDeferred
async def test_request_headers_lose_hop_by_hop_and_keep_repeats(gateway, any_upstream):
    """``Connection: close, X-Foo`` strips X-Foo; repeats keep order; Host is the client's."""
    gw = await gateway(any_upstream)
    raw = await raw_request(
        gw.port,
        get(
            "/echo",
            b"Connection: close, X-Foo",
            b"X-Foo: private",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"Proxy-Authorization: Basic Zm9vOmJhcg==",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Upgrade: h2c",
            b"X-Multi: first",
            b"Accept: text/plain",
            b"X-Multi: second",
            b"X-Multi: third",
        ),
    )
    status, _, response_headers, body, _ = parse_response(raw)
    assert status == 200
    assert values(response_headers, b"connection") == [b"close"]
    headers = json.loads(body)["headers"]
    names = {name for name, _ in headers}
    assert not names & {
        "x-foo", "keep-alive", "proxy-connection", "proxy-authorization",
        "te", "trailer", "upgrade",
    }
    assert [v for k, v in headers if k == "connection"] in ([], ["keep-alive"])
    assert [v for k, v in headers if k == "x-multi"] == ["first", "second", "third"]
    assert [v for k, v in headers if k == "host"] == ["gw.example"]
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for k, v in headers if k == "x-forwarded-proto"] == ["http"]
    assert [v for k, v in headers if k == "x-forwarded-host"] == ["gw.example"]


@pytest_twisted.ensureDeferred
async def test_forwarded_for_is_extended_only_for_trusted_proxies(gateway, twisted_upstream):
    """A client's X-Forwarded-For is kept only when the peer is in trusted_proxies."""
    untrusted = await gateway(twisted_upstream.base)
    trusted = await gateway(
        twisted_upstream.base, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    request = get("/echo", b"X-Forwarded-For: 198.51.100.9")
    for gw, expected in ((untrusted, "127.0.0.1"), (trusted, "198.51.100.9, 127.0.0.1")):
        headers = json.loads(parse_response(await raw_request(gw.port, request))[3])["headers"]
        assert [v for k, v in headers if k == "x-forwarded-for"] == [expected]


@pytest_twisted.ensureDeferred
async def test_content_encoding_passes_through_untouched(gateway, any_upstream):
    """No Accept-Encoding is invented, the client's is kept, gzip bytes arrive unchanged."""
    gw = await gateway(any_upstream)
    for sent, seen in ((None, b"none"), (b"br", b"br"), (b"gzip", b"gzip")):
        extra = [b"Accept-Encoding: " + sent] if sent else []
        raw = await raw_request(gw.port, get("/gzip", *extra))
        status, _, headers, body, _ = parse_response(raw)
        assert status == 200
        assert values(headers, b"x-seen-accept-encoding") == [seen]
        assert values(headers, b"content-encoding") == [b"gzip"]
        assert body == GZIPPED


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_are_not_replayed_to_the_next_user(gateway, any_upstream):
    """Every Set-Cookie reaches its client separately; the next user's request carries none."""
    gw = await gateway(any_upstream)
    first = parse_response(await raw_request(gw.port, get("/cookie")))
    assert sorted(v.split(b";")[0] for v in values(first[2], b"set-cookie")) == [
        b"session=secret",
        b"theme=dark",
    ]
    second = parse_response(await raw_request(gw.port, get("/cookie")))
    assert values(second[2], b"x-seen-cookie") == [b"none"]
    own = parse_response(await raw_request(gw.port, get("/cookie", b"Cookie: mine=1")))
    assert values(own[2], b"x-seen-cookie") == [b"mine=1"]


@pytest_twisted.ensureDeferred
async def test_redirects_are_returned_not_followed(gateway, twisted_upstream):
    """A 302 and its Location reach the client; the upstream is asked only once."""
    gw = await gateway(twisted_upstream.base)
    status, _, headers, body, _ = parse_response(await raw_request(gw.port, get("/redirect")))
    assert (status, values(headers, b"location"), body) == (302, [b"/elsewhere"], b"moved")
    assert len(twisted_upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_status_line_is_the_upstreams(gateway, twisted_upstream):
    """An unusual code and reason phrase reach the client exactly."""
    gw = await gateway(twisted_upstream.base)
    raw = await raw_request(gw.port, get("/status/299"))
    assert raw.startswith(b"HTTP/1.1 299 Fine Thanks\r\n")
    assert parse_response(raw)[3] == b"status body"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("code", [204, 304])
async def test_204_and_304_carry_no_body(gateway, twisted_upstream, code):
    """No-content and not-modified answers have neither a body nor chunked framing."""
    gw = await gateway(twisted_upstream.base)
    raw = await raw_request(gw.port, get(f"/status/{code}"))
    head, _, after = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % code)
    assert b"transfer-encoding" not in head.lower()
    assert values(parse_response(raw)[2], b"etag") == [b'"v1"']
    assert after == b""


@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_are_dropped(gateway):
    """The upstream's connection-level headers stay between it and the gateway."""
    port, base = await canned_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-Sum\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-End: 1\r\n\r\nok"
    )
    try:
        gw = await gateway(base)
        status, _, headers, body, _ = parse_response(await raw_request(gw.port, get("/")))
        names = {name.lower() for name, _ in headers}
        assert (status, body) == (200, b"ok")
        assert not names & {b"keep-alive", b"proxy-authenticate", b"trailer"}
        assert values(headers, b"connection") == [b"close"]
        assert values(headers, b"set-cookie") == [b"a=1", b"b=2"]
        assert values(headers, b"x-end") == [b"1"]
    finally:
        await port.stopListening()


# -- bodies ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chunked_upload_is_forwarded_whole(gateway, any_upstream):
    """A chunked upload reaches the upstream complete, with a Content-Length."""
    gw = await gateway(any_upstream)
    payload = bytes(range(256)) * 4096
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 100_000]), payload[i : i + 100_000])
        for i in range(0, len(payload), 100_000)
    )
    raw = await raw_request(
        gw.port,
        get("/echo", b"Transfer-Encoding: chunked", method=b"POST", body=chunks + b"0\r\n\r\n"),
    )
    seen = json.loads(parse_response(raw)[3])
    assert seen["body_length"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert [v for k, v in seen["headers"] if k == "content-length"] == [str(len(payload))]


@pytest_twisted.ensureDeferred
async def test_announced_oversized_body_is_refused_before_upstream_contact(
    gateway, twisted_upstream
):
    """Content-Length over max_body_size: 413 JSON at once, even while the client keeps sending."""
    gw = await gateway(twisted_upstream.base, max_body_size=1024)
    request = get("/echo", b"Content-Length: 4194304", method=b"POST", body=b"x" * 1_048_576)
    status, _, headers, body, complete = parse_response(await raw_request(gw.port, request))
    assert (status, complete) == (413, True)
    assert values(headers, b"content-type") == [b"application/json"]
    assert json.loads(body)["error"] == "body_too_large"
    assert twisted_upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused(gateway, twisted_upstream):
    """A chunked upload is counted: past max_body_size it gets 413, upstream never sees it."""
    gw = await gateway(twisted_upstream.base, max_body_size=1024)
    client = await raw_connect(gw.port)
    client.transport.write(get("/echo", b"Transfer-Encoding: chunked", method=b"PUT"))
    client.transport.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
    client.transport.write(b"1\r\nz\r\n")
    raw = await client.closed.addTimeout(10, reactor)
    assert parse_response(raw)[0] == 413
    assert twisted_upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_upstream_answering_before_reading_the_upload(gateway):
    """An upstream may refuse an upload early: the client gets that answer, no error follows."""
    upstream = Factory.forProtocol(EarlyAnswer)
    upstream.lost = 0
    port = await listen(upstream)
    try:
        gw = await gateway(f"http://127.0.0.1:{port.getHost().port}")
        request = get("/up", b"Content-Length: 8000000", method=b"POST", body=b"u" * 8_000_000)
        with capturedLogs() as events:
            raw = await raw_request(gw.port, request)
            # an error would be logged while the gateway ends the upstream connection
            await settle(lambda: upstream.lost, "the upstream connection closed")
        assert parse_response(raw)[:2] == (413, b"Not Here")
        assert [e for e in events if e["log_level"] in (LogLevel.error, LogLevel.critical)] == []
    finally:
        await port.stopListening()


# -- streaming and backpressure --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_response_streams_before_the_upstream_finishes(gateway, twisted_upstream):
    """The client reads the first chunk while the upstream is still producing the rest."""
    gw = await gateway(twisted_upstream.base)
    client = await raw_connect(gw.port)
    client.transport.write(get("/stream"))
    await client.received(b"first chunk;").addTimeout(10, reactor)
    assert b"second chunk" not in client.data
    twisted_upstream.release.callback(None)
    status, _, _, body, complete = parse_response(await client.closed.addTimeout(10, reactor))
    assert (status, body, complete) == (200, b"first chunk;second chunk", True)


async def _downloading(gateway, twisted_upstream, size: int, received: bytes) -> RawClient:
    """A client of a gateway in front of ``twisted_upstream`` that asked /big for ``size`` bytes and has ``received``."""
    gw = await gateway(twisted_upstream.base)
    client = await raw_connect(gw.port)
    client.transport.write(get(f"/big?size={size}"))
    await client.received(received).addTimeout(10, reactor)
    return client


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream(gateway, twisted_upstream):
    """While a client does not read, the gateway stops reading the upstream (bounded buffering)."""
    size = 256 * 1024 * 1024
    client = await _downloading(gateway, twisted_upstream, size, b"\r\n\r\n")
    client.transport.pauseProducing()
    await settle(lambda: twisted_upstream.firehoses, "the upstream to start")
    firehose = twisted_upstream.firehoses[0]
    await settle(lambda: firehose.paused, "the upstream to be paused")
    # Stalled: kernel socket buffers and a few small user-space buffers fill up,
    # then the upstream stays paused and stops growing.
    before = -1
    while firehose.sent != before:
        before = firehose.sent
        await deferLater(reactor, 0.3)
    assert firehose.paused
    assert firehose.sent < 64 * 1024 * 1024, firehose.sent
    received = len(client.data)
    client.transport.resumeProducing()
    raw = await client.closed.addTimeout(60, reactor)
    assert len(raw) > received
    status, _, _, body, complete = parse_response(raw)
    assert (status, len(body), complete) == (200, size, True)


# -- failures -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_refused_upstream_is_502(gateway):
    """Nothing listening upstream: 502 JSON."""
    gw = await gateway(f"http://127.0.0.1:{closed_port()}")
    status, _, headers, body, _ = parse_response(await raw_request(gw.port, get("/")))
    assert status == 502
    assert values(headers, b"content-type") == [b"application/json"]
    assert set(json.loads(body)) == {"error", "detail"}


@pytest_twisted.ensureDeferred
async def test_upstream_reset_before_answering_is_502(gateway):
    """An upstream that resets the connection instead of answering: 502 JSON."""
    port, base = await canned_upstream(None)
    try:
        gw = await gateway(base)
        status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/")))
        assert status == 502
        assert json.loads(body)["error"] == "bad_gateway"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_response_head_in_time_is_504_and_upstream_is_dropped(gateway, twisted_upstream):
    """No response head within request_timeout: 504 JSON, and the upstream sees the close."""
    gw = await gateway(twisted_upstream.base, request_timeout=0.5)
    status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/hang")))
    assert status == 504
    assert json.loads(body)["error"] == "gateway_timeout"
    await settle(lambda: twisted_upstream.lost, "the upstream to see the close")


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_the_answer_cancels_the_upstream_request(
    gateway, twisted_upstream
):
    """A client that disconnects while waiting makes the gateway close its upstream connection."""
    gw = await gateway(twisted_upstream.base)
    client = await raw_connect(gw.port)
    client.transport.write(get("/hang"))
    await twisted_upstream.arrived.addTimeout(10, reactor)
    client.transport.loseConnection()
    await settle(lambda: twisted_upstream.lost, "the upstream to see the close")


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_body_stops_the_upstream(gateway, twisted_upstream):
    """A client that disconnects during a download makes the gateway drop the upstream too."""
    client = await _downloading(gateway, twisted_upstream, 1024 * 1024 * 1024, b"xxxx")
    client.transport.abortConnection()
    await settle(lambda: twisted_upstream.lost, "the upstream to see the close")
    assert twisted_upstream.firehoses[0].stopped


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/truncate", "/truncate/chunked"])
async def test_upstream_dying_mid_body_is_not_passed_off_as_complete(
    gateway, twisted_upstream, path
):
    """If the upstream breaks off a body, the client sees a cut connection, not a full answer."""
    gw = await gateway(twisted_upstream.base)
    status, _, _, body, complete = parse_response(await raw_request(gw.port, get(path)))
    assert (status, body, complete) == (200, b"0123456789", False)


# -- connections ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_the_upstream_closes_leaves_the_pool_with_its_timer(gateway, client):
    """Upstreams close idle keep-alive connections (gunicorn after 2 s): the pool lets them go at once."""
    upstream = TwistedUpstream()
    site = Site(upstream)
    site.timeOut = 0.3
    port = await listen(site)
    try:
        gw = await gateway(f"http://127.0.0.1:{port.getHost().port}")
        response = await client.get(gw.url + "/echo")
        assert response.code == 200
        await response.content()
        idle_timeout = gw.forwarder.pool.cachedConnectionTimeout

        def idle_timers() -> list:
            """Delayed calls due when the pool's idle timeout would end a connection put in it just now."""
            due = reactor.seconds() + idle_timeout
            return [c for c in reactor.getDelayedCalls() if c.active() and abs(c.getTime() - due) < idle_timeout / 10]

        await settle(lambda: len(connections_to(port.getHost().port)) == 1, "a pooled connection")
        [timer] = idle_timers()
        await settle(lambda: not connections_to(port.getHost().port), "the closed connection gone")
        assert not timer.active() and idle_timers() == []
        response = await client.get(gw.url + "/echo")  # and the next request opens a fresh one
        assert response.code == 200
        await response.content()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_reused(gateway, twisted_upstream, client):
    """Sequential requests share one persistent upstream connection."""
    gw = await gateway(twisted_upstream.base, upstream_keepalive=4)
    assert gw.forwarder.pool.maxPersistentPerHost == 4
    ports = set()
    for _ in range(3):
        response = await client.get(gw.url + "/echo")
        ports.add((await response.json())["peer_port"])
    assert len(ports) == 1


@pytest_twisted.ensureDeferred
async def test_an_answered_request_is_freed_without_the_cycle_collector(gateway, twisted_upstream):
    """
    Nothing the forwarding of a request made is left in a reference cycle once
    it is answered: freed at once, not when the cycle collector next runs
    (whose passes, under load, grow with what waits for it).
    """
    gw = await gateway(twisted_upstream.base)

    async def requests() -> None:
        for _ in range(3):
            assert (await raw_request(gw.port, get("/echo/x"))).startswith(b"HTTP/1.1 200 ")

    assert await left_to_the_collector(requests) == set()
