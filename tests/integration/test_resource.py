"""
The gateway's resource tree on a loopback port, as clients see it: JSON
refusals for unknown routes, climbing paths and forbidden upgrades, the
health check, and the same tree mounted below a path of an existing ``Site``.

HTTP forwarding is replaced by a recording forwarder (the resource's seam), so
these tests show where a request is routed without depending on the proxy.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
import treq
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tests.support import (
    UPGRADE,
    Gateway,
    Upstream,
    http_error,
    listen,
    raw_connect,
    settle,
    start_gateway,
    ws_connect,
)
from twisted_gateway.config import parse_config
from twisted_gateway.interfaces import IHTTPForwarder
from twisted_gateway.resource import build_gateway_resource

#: Every route points at a port nothing listens on unless a test says otherwise.
CONFIG = """
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{chat_port}

[route:files]
prefix = /v1/files
upstream = http://127.0.0.1:{files_port}
websocket = false
"""

#: A guard against a hang, not a speed assertion.
GUARD = 10


def _config(chat_port: int = 1, files_port: int = 1) -> str:
    return CONFIG.format(chat_port=chat_port, files_port=files_port)


@implementer(IHTTPForwarder)
class RecordingForwarder:
    """Stands in for the HTTP forwarder: records what it was asked to forward."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes, bytes]] = []

    def forward(self, request, pool, path: bytes, query: bytes, *, route_name: str = "", **_: Any):
        self.calls.append((route_name, pool.choose().url, path, query))
        request.setHeader(b"content-type", b"application/json")
        return b'{"forwarded": true}\n'

    def close(self) -> Deferred[None]:
        return succeed(None)


async def _raw_exchange(port: int, request: bytes, marker: bytes = b"}\n") -> bytes:
    """Send raw bytes; return what came back once ``marker`` (a JSON body's end) arrived."""
    client = await raw_connect(port)
    try:
        client.transport.write(request)
        d = client.wait_for(marker)
        d.addTimeout(GUARD, reactor)
        return await d
    finally:
        client.transport.loseConnection()
        await client.lost


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("latin-1")


async def _treq_get(url: str) -> tuple[int, str, Any]:
    """One GET on a connection of its own, closed afterwards."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.get(url, pool=pool)
        body = await response.content()
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, content_type, body
    finally:
        await pool.closeCachedConnections()


class LegacyPage(Resource):
    """A page the host site served before the gateway was mounted next to it."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"the legacy page"


async def _start_mounted(config: str, **kwargs: Any) -> Gateway:
    """An existing site with its own page at /legacy and the gateway mounted at /gw."""
    resource = build_gateway_resource(parse_config(config), reactor, **kwargs)
    root = Resource()
    root.putChild(b"legacy", LegacyPage())
    root.putChild(b"gw", resource)
    site = Site(root)
    site.noisy = False
    return Gateway(await listen(site), resource)


async def _exchange(start: Callable[..., Awaitable[Gateway]], request: bytes) -> tuple[bytes, list[Any]]:
    """``request`` sent raw to a gateway ``start`` built: the raw answer and what was forwarded."""
    forwarder = RecordingForwarder()
    gw = await start(_config(), forwarder=forwarder)
    try:
        raw = await _raw_exchange(gw.number, request)
    finally:
        await gw.close()
    return raw, forwarder.calls


async def _close_ws(gw: Gateway, client) -> None:
    if client.state != WebSocketProtocol.STATE_CLOSED:
        client.sendClose(1000)
        closed = client.closed
        closed.addTimeout(GUARD, reactor)
        await closed
    await settle(lambda: len(gw.registry) == 0 and not gw.registry.handshakes)


# -- the gateway as a Site root ------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/v2/users", "/v1/chatroom", "/", "/v1"])
async def test_a_path_no_route_serves_is_404_json(path):
    """No matching prefix (segment boundaries count) is a JSON 404 naming the path."""
    forwarder = RecordingForwarder()
    gw = await start_gateway(_config(), forwarder=forwarder)
    try:
        code, content_type, body = await _treq_get(gw.url(path, "http"))
    finally:
        await gw.close()
    assert (code, content_type) == (404, "application/json")
    document = json.loads(body)
    assert document["error"] == "not_found"
    assert path in document["detail"]
    assert forwarder.calls == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path",
    [
        b"/../etc",
        b"/v1/chat/../../../etc/passwd",
        b"/%2e%2e/etc",
        b"/v1/chat/%2E%2E/%2e%2e/%2e%2e/x",
        b"//../x",
    ],
)
async def test_a_path_climbing_above_root_is_400_json(path):
    """``GET /../etc`` sent as raw bytes is refused with a JSON 400; nothing is forwarded."""
    raw, forwarded = await _exchange(start_gateway, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, document = http_error(raw)
    assert status == 400
    assert document["error"] == "bad_request"
    assert b"content-type: application/json" in raw.lower()
    assert forwarded == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "site, target, route, path, query",
    [
        ("root", b"/v1/files/../chat/rooms?x=1", "chat", b"/v1/chat/rooms", b"x=1"),
        ("root", b"/v1/chat/%2e%2e/files/a", "files", b"/v1/files/a", b""),
        ("root", b"/v1//chat/./rooms/", "chat", b"/v1/chat/rooms/", b""),
        ("root", b"/v1/files/a%2Fb?q=/../x", "files", b"/v1/files/a%2Fb", b"q=/../x"),
        # mounted at /gw: the upstream sees the path below /gw, normalised, with the original query
        ("mounted", b"/gw/v1/chat/rooms?x=1", "chat", b"/v1/chat/rooms", b"x=1"),
        ("mounted", b"/gw/v1/files", "files", b"/v1/files", b""),
        ("mounted", b"/gw/v1/chat/../files/a", "files", b"/v1/files/a", b""),
        ("mounted", b"/gw//v1/chat", "chat", b"/v1/chat", b""),
    ],
)
async def test_the_normalised_path_is_routed_and_forwarded(site, target, route, path, query):
    """The route that was checked is the route that serves: dot segments resolve first."""
    start = {"root": start_gateway, "mounted": _start_mounted}[site]
    raw, forwarded = await _exchange(start, b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert forwarded == [(route, "http://127.0.0.1:1", path, query)]


@pytest_twisted.ensureDeferred
async def test_an_upgrade_to_a_route_without_websocket_is_400_json():
    """``websocket = false`` refuses the handshake (Firefox's headers) before any upstream is asked."""
    upstream = Upstream()
    up_port = await listen(upstream)
    port = up_port.getHost().port
    gw = await start_gateway(_config(chat_port=port, files_port=port))
    try:
        raw = await _raw_exchange(gw.number, UPGRADE.format(path="/v1/files/ws").encode())
    finally:
        await gw.close()
        await up_port.stopListening()
    status, document = http_error(raw)
    assert status == 400
    assert document["error"] == "bad_request"
    assert "files" in document["detail"]
    assert b"sec-websocket-accept" not in raw.lower()
    assert upstream.handshakes == []


@pytest_twisted.ensureDeferred
async def test_healthz_answers_200_json():
    """GET /healthz is the gateway's own answer, even when a route covers ``/``."""
    forwarder = RecordingForwarder()
    gw = await start_gateway(
        _config() + "[route:root]\nprefix = /\nupstream = http://127.0.0.1:1\n", forwarder=forwarder
    )
    try:
        code, content_type, body = await _treq_get(gw.url("/healthz", "http"))
    finally:
        await gw.close()
    assert (code, content_type) == (200, "application/json")
    assert json.loads(body)["status"] == "ok"
    assert forwarder.calls == []


# -- the gateway mounted below a path of an existing Site -----------------------------


@pytest_twisted.ensureDeferred
async def test_mounted_gateway_answers_health_and_404_below_its_mount_point():
    """Under /gw, /gw/healthz is the health check and /gw/v2 is a 404 naming /v2."""
    gw = await _start_mounted(_config(), forwarder=RecordingForwarder())
    try:
        health = await _treq_get(gw.url("/gw/healthz", "http"))
        missing = await _treq_get(gw.url("/gw/v2", "http"))
        legacy = await _treq_get(gw.url("/legacy", "http"))
    finally:
        await gw.close()
    assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
    assert missing[0] == 404
    assert json.loads(missing[2]) == {"error": "not_found", "detail": "no route for /v2"}
    assert legacy[:2] == (200, "text/plain") and legacy[2] == b"the legacy page"


@pytest_twisted.ensureDeferred
async def test_mounted_gateway_does_not_let_a_path_climb_out_of_its_mount_point():
    """``/gw/../etc`` cannot reach outside the gateway: JSON 400, nothing forwarded."""
    raw, forwarded = await _exchange(_start_mounted, _get("/gw/../etc"))
    assert http_error(raw)[0] == 400
    assert forwarded == []


@pytest_twisted.ensureDeferred
async def test_paths_outside_the_mount_point_are_not_the_gateways():
    """/v1/chat/rooms without the /gw prefix is the host site's 404, not forwarded."""
    forwarder = RecordingForwarder()
    gw = await _start_mounted(_config(), forwarder=forwarder)
    try:
        code, _, _ = await _treq_get(gw.url("/v1/chat/rooms", "http"))
    finally:
        await gw.close()
    assert code == 404
    assert forwarder.calls == []


@pytest_twisted.ensureDeferred
async def test_mounted_gateway_relays_websockets_below_its_mount_point():
    """ws://host/gw/v1/chat/ws?room=a reaches the upstream as /v1/chat/ws?room=a and echoes."""
    upstream = Upstream()
    up_port = await listen(upstream)
    gw = await _start_mounted(_config(chat_port=up_port.getHost().port))
    try:
        client = await ws_connect(gw.url("/gw/v1/chat/ws?room=a"))
        try:
            handshake = upstream.handshakes[-1]
            assert handshake.path == "/v1/chat/ws"
            assert handshake.params == {"room": ["a"]}
            client.sendMessage(b"hello", isBinary=False)
            assert await client.next_message() == (b"hello", False)
        finally:
            await _close_ws(gw, client)
    finally:
        await gw.close()
        await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_mounted_gateway_refuses_an_upgrade_to_a_route_without_websocket():
    """Below the mount point, ``websocket = false`` is still a JSON 400."""
    gw = await _start_mounted(_config())
    try:
        raw = await _raw_exchange(gw.number, UPGRADE.format(path="/gw/v1/files/ws").encode())
    finally:
        await gw.close()
    status, document = http_error(raw)
    assert (status, document["error"]) == (400, "bad_request")


# -- found while writing these tests ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_upstream_url_with_an_upper_case_scheme_relays_websockets():
    """
    URL schemes are case-insensitive (RFC 3986 3.1) and the config accepts
    ``upstream = HTTP://...``: WebSockets on that route must work, not fail with 500.
    """
    upstream = Upstream()
    up_port = await listen(upstream)
    gw = await start_gateway(
        f"[route:chat]\nprefix = /v1/chat\nupstream = HTTP://127.0.0.1:{up_port.getHost().port}\n"
    )
    try:
        raw = await _raw_exchange(gw.number, UPGRADE.format(path="/v1/chat/ws").encode(), b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 101 "), raw
    finally:
        await settle(lambda: not gw.registry.handshakes and len(gw.registry) == 0)
        await gw.close()
        await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_upgrade_the_upstream_refuses_logs_no_unhandled_error():
    """The client gets the upstream's 403 as it wrote it and the gateway's log stays free of errors."""
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("isError") or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    upstream = Upstream(refuse=(403, "members only"))
    up_port = await listen(upstream)
    gw = await start_gateway(_config(chat_port=up_port.getHost().port))
    globalLogPublisher.addObserver(observe)
    try:
        client = await raw_connect(gw.number)
        client.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
        lost = client.lost
        lost.addTimeout(GUARD, reactor)
        raw = await lost
        await settle(lambda: not gw.registry.handshakes)
    finally:
        globalLogPublisher.removeObserver(observe)
        await gw.close()
        await up_port.stopListening()
    assert raw.startswith(b"HTTP/1.1 403 members only\r\n"), raw
    assert [e.get("log_text") or e.get("log_format") or e.get("why") for e in errors] == []
