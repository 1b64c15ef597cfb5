"""
Operating the gateway, through a real gateway on loopback: Prometheus metrics
that move as traffic flows, keepalive pings that find a silent peer (on an
injected clock), connection limits, the Origin policy, ``/readyz`` and the
431 answer to an oversized request head.

Every refusal is read from the wire as a client sees it: a status line and a
JSON body. Timeouts here only stop a hung test; none is a speed expectation.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.protocol import WebSocketProtocol
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import LogLevel, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support import (
    ClientProtocol,
    Gateway,
    LogEvents,
    Upstream,
    UpstreamProtocol,
    http_error,
    listen,
    raw_connect,
    route_config,
    settle,
    start_gateway,
    ws_connect,
)
from twisted_gateway.config import parse_config
from twisted_gateway.resource import GatewayResource, build_gateway_resource
from twisted_gateway.site import build_site

#: A guard against a hang, not a speed assertion.
GUARD = 10
OPEN = WebSocketProtocol.STATE_OPEN
CLOSED = WebSocketProtocol.STATE_CLOSED
SECRET = "operations-test-secret-0123456789abcdef"


# -- helpers ---------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingUpstream(Upstream):
    """An upstream that also counts TCP connections, handshake or not."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.tcp_connections = 0

    def buildProtocol(self, addr):
        self.tcp_connections += 1
        return super().buildProtocol(addr)


async def _upstream(**options: Any) -> tuple[CountingUpstream, Any, int]:
    upstream = CountingUpstream(**options)
    port = await listen(upstream)
    return upstream, port, port.getHost().port


def _request(path: str, headers: dict[str, str] | None = None, *, upgrade: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
    else:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _handshake(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict | None]:
    """
    A raw WebSocket upgrade: the status, and the JSON body of the gateway's refusal. An
    accepted connection is dropped at once (the gateway then closes its upstream).
    """
    client = await raw_connect(port)
    try:
        client.transport.write(_request(path, headers, upgrade=True))
        head = client.wait_for(b"\r\n\r\n")
        head.addTimeout(GUARD, reactor)
        data = await head
        status = int(data.split(b" ", 2)[1])
        if status == 101:
            return status, None
        if b"application/json" not in data.lower():
            return status, None  # an upstream's own refusal, passed on as it is
        whole = client.wait_for(b"}\n")
        whole.addTimeout(GUARD, reactor)
        return http_error(await whole)
    finally:
        client.transport.loseConnection()
        await client.lost


async def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One plain GET on a connection of its own; status and body."""
    client = await raw_connect(port)
    client.transport.write(_request(path, headers))
    lost = client.lost
    lost.addTimeout(GUARD, reactor)
    data = await lost
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _get_json(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, body = await _get(port, path, headers)
    return status, json.loads(body)


Samples = dict[tuple[str, frozenset], float]


async def _scrape(port: int) -> Samples:
    """``GET /metrics``, parsed as Prometheus does."""
    status, body = await _get(port, "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series is absent (a counter not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


async def _drop_all(gw: Gateway, *clients) -> None:
    for client in clients:
        if client.state != CLOSED:
            client.dropConnection(abort=True)
    await settle(
        lambda: not gw.registry.pairs and not gw.registry.handshakes and not gw.registry.total_active(),
        "every relay gone",
    )


async def _close_all(gw: Gateway, *ports) -> None:
    await gw.close()
    for port in ports:
        await port.stopListening()


async def _still_open_then_closed(gw: Gateway, up_port, client, upstream: Upstream) -> None:
    """Both legs of the pair are still open; then the keepalive stops and the client closes with 1000."""
    assert client.state == OPEN and len(upstream.open_protocols) == 1
    await gw.gateway.stopService()
    client.sendClose(1000)
    assert await client.closed == (1000, None)
    await _drop_all(gw)
    await _close_all(gw, up_port)


# -- metrics -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_count_relayed_messages_bytes_opens_and_closes_per_direction():
    """
    A scrape after WebSocket traffic shows the messages and payload bytes per
    direction, one accepted handshake, the pair open while it is, then zero
    open and the close counted with the side that closed first and its code;
    one access-log event describes the session.
    """
    upstream, up_port, number = await _upstream()
    gw = await start_gateway(route_config(number))
    with LogEvents("twisted_gateway.access") as access:
        before = await _scrape(gw.number)

        client = await ws_connect(gw.url("/v1/chat/ws?room=metrics"))
        sent = [(b"hello", False), (b"\x00" * 100, True), (b"", False)]
        for payload, binary in sent:
            client.sendMessage(payload, isBinary=binary)
        for expected in sent:
            assert await client.next_message() == expected

        during = await _scrape(gw.number)
        route = {"route": "chat"}
        assert _value(during, "wsgateway_ws_open", **route) == 1
        assert _moved(before, during, "wsgateway_ws_handshakes_total", outcome="accepted", **route) == 1
        for direction in ("client_to_upstream", "upstream_to_client"):
            labels = dict(route, direction=direction)
            assert _moved(before, during, "wsgateway_ws_messages_total", **labels) == 3
            assert _moved(before, during, "wsgateway_ws_bytes_total", **labels) == 105
            assert _moved(before, during, "wsgateway_ws_message_size_bytes_count", **labels) == 3

        client.sendClose(1000, "done")
        assert await client.closed == (1000, "done")
        await settle(lambda: not gw.registry.pairs, "the pair gone")

        after = await _scrape(gw.number)
        assert _value(after, "wsgateway_ws_open", **route) == 0
        frame = dict(reason="close_frame", **route)
        assert _moved(before, after, "wsgateway_ws_closes_total", side="client", code="1000", **frame) == 1

        # The upstream closing first is counted on its side, with its code.
        client = await ws_connect(gw.url("/v1/chat/ws?room=metrics"))
        await settle(lambda: upstream.open_protocols, "the upstream connection")
        next(iter(upstream.open_protocols)).sendClose(4001, "upstream says bye")
        assert await client.closed == (4001, "upstream says bye")
        await settle(lambda: not gw.registry.pairs, "the pair gone")
        last = await _scrape(gw.number)
        assert _value(last, "wsgateway_ws_open", **route) == 0
        assert _moved(after, last, "wsgateway_ws_closes_total", side="upstream", code="4001", **frame) == 1
        assert _moved(before, last, "wsgateway_ws_handshakes_total", outcome="accepted", **route) == 2

    sessions = [e for e in access.events if e.get("event") == "ws_session"]
    assert len(sessions) == 2, access.events
    first = sessions[0]
    assert first["route"] == "chat"
    assert first["path"] == "/v1/chat/ws"
    assert first["peer"] == "127.0.0.1"
    assert first["upstream"] == f"http://127.0.0.1:{number}"
    assert first["side"] == "client" and first["code"] == 1000
    assert first["messages_in"] == 3 and first["messages_out"] == 3
    assert first["bytes_in"] == 105 and first["bytes_out"] == 105
    assert first["duration"] >= 0
    assert (sessions[1]["side"], sessions[1]["code"]) == ("upstream", 4001)
    # the event Logger.info would emit: its keys in Logger.emit's order, at info, in the access namespace
    assert [k for k in first if k.startswith("log_")][:6] == [
        "log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time"]
    assert (first["log_level"], first["log_namespace"]) == (LogLevel.info, "twisted_gateway.access")
    assert formatEvent(first) == f"websocket chat /v1/chat/ws 127.0.0.1 closed by client (1000) after {first['duration']:.3f}s"
    await _drop_all(gw)
    await _close_all(gw, up_port)


def _outcomes_config(echo: int, refusing: int, dead: int, dead2: int) -> str:
    return f"""
[gateway]
ws_open_timeout = 5

[auth]
algorithms = HS256
secret = {SECRET}

[route:open]
prefix = /v1/open
upstream = http://127.0.0.1:{echo}
auth = none

[route:secure]
prefix = /v1/secure
upstream = http://127.0.0.1:{echo}

[route:browser]
prefix = /v1/browser
upstream = http://127.0.0.1:{echo}
auth = none
allowed_origins = https://app.example.com

[route:solo]
prefix = /v1/solo
upstream = http://127.0.0.1:{echo}
auth = none
max_websockets = 1

[route:dead]
prefix = /v1/dead
upstream = http://127.0.0.1:{dead} http://127.0.0.1:{dead2}
auth = none

[route:refusing]
prefix = /v1/refusing
upstream = http://127.0.0.1:{refusing}
auth = none
"""


@pytest_twisted.ensureDeferred
async def test_metrics_count_each_handshake_outcome_and_upstream_health():
    """
    Every way a handshake ends is counted on its route: accepted, unauthorized
    (no token), forbidden (Origin), limited (max_websockets), bad_gateway (no
    connection) and refused_by_upstream (the upstream's 403); of the two
    instances that refused connections, the first shows
    ``wsgateway_upstream_up 0`` and the last one stays in service (passive
    health never takes a route's last instance), the others 1; each refused
    connect is counted in ``wsgateway_upstream_failures_total``.
    """
    echo, echo_port, echo_number = await _upstream()
    refusing, refusing_port, refusing_number = await _upstream(refuse=(403, "not you"))
    dead, dead2 = _closed_port(), _closed_port()
    gw = await start_gateway(_outcomes_config(echo_number, refusing_number, dead, dead2))
    ports = {"dead": dead, "refusing": refusing_number}
    before = await _scrape(gw.number)
    for route in ("open", "secure", "browser", "solo", "dead", "refusing"):
        upstream_url = f"http://127.0.0.1:{ports.get(route, echo_number)}"
        assert _value(before, "wsgateway_upstream_up", route=route, upstream=upstream_url) == 1

    accepted = await ws_connect(gw.url("/v1/open/ws"))
    holder = await ws_connect(gw.url("/v1/solo/ws"))
    refusals = [
        ("/v1/secure/ws", {}, 401, "missing_token"),
        ("/v1/browser/ws", {"Origin": "https://evil.example.com"}, 403, "forbidden_origin"),
        ("/v1/solo/ws", {}, 503, "limited"),
        ("/v1/dead/ws", {}, 502, "bad_gateway"),
        ("/v1/refusing/ws", {}, 403, None),
    ]
    for path, headers, status, error in refusals:
        got_status, body = await _handshake(gw.number, path, headers)
        assert got_status == status, (path, body)
        if error is not None:
            assert body["error"] == error, (path, body)

    after = await _scrape(gw.number)
    expected = [
        ("open", "accepted"),
        ("solo", "accepted"),
        ("secure", "unauthorized"),
        ("browser", "forbidden"),
        ("solo", "limited"),
        ("dead", "bad_gateway"),
        ("refusing", "refused_by_upstream"),
    ]
    for route, outcome in expected:
        moved = _moved(before, after, "wsgateway_ws_handshakes_total", route=route, outcome=outcome)
        assert moved == 1, (route, outcome)
    assert _moved(before, after, "wsgateway_auth_failures_total", route="secure", reason="missing_token") == 1
    assert _value(after, "wsgateway_ws_open", route="open") == 1
    assert _value(after, "wsgateway_ws_open", route="solo") == 1
    assert _value(after, "wsgateway_upstream_up", route="dead", upstream=f"http://127.0.0.1:{dead}") == 0
    assert _value(after, "wsgateway_upstream_up", route="dead", upstream=f"http://127.0.0.1:{dead2}") == 1
    for port in (dead, dead2):
        labels = dict(route="dead", upstream=f"http://127.0.0.1:{port}", reason="connect_refused")
        assert _value(after, "wsgateway_upstream_failures_total", **labels) == 1
    assert _value(after, "wsgateway_upstream_up", route="open", upstream=f"http://127.0.0.1:{echo_number}") == 1
    # Neither the Origin nor the limit refusal reached the upstream.
    assert len(echo.handshakes) == 2

    accepted.sendClose(1000)
    holder.sendClose(1000)
    await accepted.closed
    await holder.closed
    await _drop_all(gw)
    final = await _scrape(gw.number)
    assert all(_value(final, "wsgateway_ws_open", route=r) == 0 for r in ("open", "solo"))
    await _close_all(gw, echo_port, refusing_port)


class _Pages(Resource):
    """An HTTP upstream: 200 for a path ending in ``/ok``, 404 for anything else."""

    isLeaf = True

    def render(self, request) -> bytes:
        if not request.path.endswith(b"/ok"):
            request.setResponseCode(404)
        return b"page\n"


@pytest_twisted.ensureDeferred
async def test_metrics_count_http_requests_by_route_method_and_status():
    """
    Forwarded requests are counted under their route, method and upstream
    status; a request no route matches under ``unrouted``; each adds to the
    duration histogram. The gateway's own pages are not counted.
    """
    pages = Site(_Pages())
    pages.noisy = False
    pages_port = await listen(pages)
    text = f"""
[route:files]
prefix = /v1/files
upstream = http://127.0.0.1:{pages_port.getHost().port}
websocket = false
"""
    gw = await start_gateway(text)
    try:
        before = await _scrape(gw.number)
        assert (await _get(gw.number, "/v1/files/ok"))[0] == 200
        assert (await _get(gw.number, "/v1/files/ok"))[0] == 200
        assert (await _get(gw.number, "/v1/files/missing"))[0] == 404
        assert (await _get(gw.number, "/nowhere"))[0] == 404
        assert (await _get(gw.number, "/healthz"))[0] == 200
        after = await _scrape(gw.number)
    finally:
        await gw.gateway.stopService()
        await _close_all(gw, pages_port)

    name = "wsgateway_http_requests_total"
    assert _moved(before, after, name, route="files", method="GET", status="200") == 2
    assert _moved(before, after, name, route="files", method="GET", status="404") == 1
    assert _moved(before, after, name, route="unrouted", method="GET", status="404") == 1
    counted = sum(_moved(before, after, n, **dict(labels)) for n, labels in after if n == name)
    assert counted == 4  # /healthz and /metrics are the gateway's own: not counted
    histogram = "wsgateway_http_request_duration_seconds_count"
    assert _moved(before, after, histogram, route="files") == 3


# -- keepalive pings on an injected clock --------------------------------------------

INTERVAL, TIMEOUT = 10.0, 5.0


class PingUpstreamProtocol(UpstreamProtocol):
    def onPing(self, payload: bytes) -> None:
        self.factory.pings.append(payload)
        if self.factory.answer_pings:
            super().onPing(payload)


class PingUpstream(Upstream):
    """An echo upstream that counts pings; a silent one sends no pong."""

    protocol = PingUpstreamProtocol

    def __init__(self, *, answer_pings: bool = True) -> None:
        super().__init__()
        self.pings: list[bytes] = []
        self.answer_pings = answer_pings


class PingClientProtocol(ClientProtocol):
    answer_pings = True

    def __init__(self) -> None:
        super().__init__()
        self.pings: list[bytes] = []

    def onPing(self, payload: bytes) -> None:
        self.pings.append(payload)
        if self.answer_pings:
            super().onPing(payload)


class SilentClientProtocol(PingClientProtocol):
    answer_pings = False


async def _ping_client(url: str, protocol: type = PingClientProtocol) -> PingClientProtocol:
    factory = WebSocketClientFactory(url, useragent=None)
    factory.protocol = protocol
    factory.noisy = False
    proto = await TCP4ClientEndpoint(reactor, factory.host, factory.port).connect(factory)
    await proto.opened
    return proto


async def _clocked_gateway(
    upstream_number: int, interval: float = INTERVAL, timeout: float = TIMEOUT
) -> tuple[Gateway, task.Clock]:
    """
    A gateway whose timers run on a ``Clock`` the test advances, while it
    connects upstream over the real reactor (``build_gateway``'s ``clock``).
    """
    settings = parse_config(
        route_config(
            upstream_number,
            f"ws_ping_interval = {interval}\nws_ping_timeout = {timeout}",
        )
    )
    clock = task.Clock()
    resource = build_gateway_resource(settings, reactor, clock=clock)
    site = Site(resource)
    site.noisy = False
    gw = Gateway(await listen(site), resource)
    gw.gateway.startService()
    return gw, clock


async def _keepalive_pair(
    client_protocol: type = PingClientProtocol, answer_pings: bool = True, **keepalive: float
) -> tuple[PingUpstream, Any, Gateway, task.Clock, PingClientProtocol]:
    """
    A client and a :class:`PingUpstream` through a :func:`_clocked_gateway`
    (``keepalive``: its interval and timeout), once the upstream is connected:
    the upstream, its port, the gateway, its clock and the client.
    """
    upstream = PingUpstream(answer_pings=answer_pings)
    up_port = await listen(upstream)
    gw, clock = await _clocked_gateway(up_port.getHost().port, **keepalive)
    client = await _ping_client(gw.url("/v1/chat/ws"), client_protocol)
    await settle(lambda: upstream.connected, "the upstream connection")
    return upstream, up_port, gw, clock, client


async def _client_dropped_upstream_told(gw: Gateway, up_port, client, upstream_leg) -> None:
    """The silent client dropped (no close frame) and 1011 to the upstream; then the gateway stops."""
    assert await upstream_leg.closed == (1011, "peer unresponsive")
    code, _ = await client.closed
    assert code == 1006 and not client.wasClean
    await gw.gateway.stopService()
    await _drop_all(gw)
    await _close_all(gw, up_port)


async def _ping_round(clock: task.Clock, client, upstream: PingUpstream, first: bool) -> None:
    """
    Advance to the next ping; wait until both ends got it; let a message go
    round (so each pong that was sent has reached the gateway: it went out
    before the message on the same connection); then advance past the timeout.
    """
    client_pings, upstream_pings = len(client.pings), len(upstream.pings)
    clock.advance(INTERVAL if first else INTERVAL - TIMEOUT)
    await settle(lambda: len(client.pings) > client_pings, "a ping at the client")
    await settle(lambda: len(upstream.pings) > upstream_pings, "a ping at the upstream")
    if client.state == OPEN:
        client.sendMessage(b"after the ping")
        assert await client.next_message() == (b"after the ping", False)
    clock.advance(TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_keepalive_pings_keep_a_responsive_pair_open_round_after_round():
    """Both legs are pinged every interval; peers that answer stay connected."""
    upstream, up_port, gw, clock, client = await _keepalive_pair()
    for round_ in range(3):
        await _ping_round(clock, client, upstream, first=round_ == 0)
    assert len(client.pings) == 3 and len(upstream.pings) == 3
    client.sendMessage(b"still here")
    assert await client.next_message() == (b"still here", False)
    await _still_open_then_closed(gw, up_port, client, upstream)


@pytest_twisted.ensureDeferred
async def test_keepalive_drops_a_silent_upstream_and_closes_the_client_with_1011():
    """
    An upstream that never answers a ping is dropped once the ping timeout is
    over (its connection ends without a close frame) and the client gets 1011
    "peer unresponsive"; the close is counted as the gateway's.
    """
    upstream, up_port, gw, clock, client = await _keepalive_pair(answer_pings=False)
    upstream_leg = upstream.connected[0]
    before = await _scrape(gw.number)

    await _ping_round(clock, client, upstream, first=True)

    code, reason = await client.closed
    assert (code, reason) == (1011, "peer unresponsive")
    up_code, _ = await upstream_leg.closed
    assert up_code == 1006  # dropped: no close frame reached the silent upstream
    assert not upstream_leg.wasClean
    await settle(lambda: not gw.registry.pairs, "the pair gone")
    after = await _scrape(gw.number)
    closes = dict(route="chat", side="gateway", code="1011", reason="ping_timeout")
    assert _moved(before, after, "wsgateway_ws_closes_total", **closes) == 1
    assert _value(after, "wsgateway_ws_open", route="chat") == 0
    await gw.gateway.stopService()
    await _drop_all(gw)
    await _close_all(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_keepalive_drops_a_silent_client_and_closes_the_upstream_with_1011():
    """The same rule the other way round: a client that sends no pong is dropped, 1011 upstream."""
    upstream, up_port, gw, clock, client = await _keepalive_pair(SilentClientProtocol)
    upstream_leg = upstream.connected[0]

    await _ping_round(clock, client, upstream, first=True)

    await _client_dropped_upstream_told(gw, up_port, client, upstream_leg)


@pytest_twisted.ensureDeferred
async def test_pings_keep_their_interval_when_the_timeout_is_longer():
    """
    With ``ws_ping_interval = 1`` and ``ws_ping_timeout = 10``, legs that
    answer are pinged every second: ten pings each in ten seconds, not one.
    """
    upstream, up_port, gw, clock, client = await _keepalive_pair(interval=1, timeout=10)
    for second in range(1, 11):
        clock.advance(1)
        await settle(lambda: len(client.pings) == second, "a ping at the client")
        await settle(lambda: len(upstream.pings) == second, "a ping at the upstream")
        # a message round trip: the pongs sent before it have reached the gateway
        client.sendMessage(b"after the ping")
        assert await client.next_message() == (b"after the ping", False)
    assert (len(client.pings), len(upstream.pings)) == (10, 10)
    await _still_open_then_closed(gw, up_port, client, upstream)


@pytest_twisted.ensureDeferred
async def test_a_leg_that_never_answers_is_dropped_ping_timeout_after_its_ping():
    """
    With interval 1 and timeout 10, a silent client gets one ping, is not
    pinged again while it owes the pong, stays open for the ten seconds and is
    dropped at the tenth (the upstream gets 1011); the answering upstream leg
    is pinged every second meanwhile.
    """
    upstream, up_port, gw, clock, client = await _keepalive_pair(SilentClientProtocol, interval=1, timeout=10)
    upstream_leg = upstream.connected[0]

    clock.advance(1)
    await settle(lambda: len(client.pings) == 1, "the first ping at the client")
    for second in range(2, 11):
        clock.advance(1)
        await settle(lambda: len(upstream.pings) == second, "a ping at the upstream")
        client.sendMessage(b"still here")
        assert await client.next_message() == (b"still here", False)
    assert len(client.pings) == 1 and client.state == OPEN

    clock.advance(1)  # ten seconds after the client's ping
    await _client_dropped_upstream_told(gw, up_port, client, upstream_leg)


# -- limits ----------------------------------------------------------------------------


def _two_routes(number: int, extra_gateway: str = "", extra_chat: str = "") -> str:
    news = f"[route:news]\nprefix = /v1/news\nupstream = http://127.0.0.1:{number}\n"
    return route_config(number, extra_gateway, extra_chat) + news


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_the_next_websocket_with_503_limited_on_any_route():
    """
    With ``max_connections = 2`` and two WebSockets open, a third on any route
    is refused with 503 JSON ``limited`` before reaching the upstream (and
    counted); once one closes, a new one is accepted.
    """
    upstream, up_port, number = await _upstream()
    gw = await start_gateway(_two_routes(number, "max_connections = 2"))
    first = await ws_connect(gw.url("/v1/chat/ws"))
    second = await ws_connect(gw.url("/v1/news/ws"))
    before = await _scrape(gw.number)
    handshakes = len(upstream.handshakes)

    for path in ("/v1/chat/ws", "/v1/news/ws"):
        status, body = await _handshake(gw.number, path)
        assert status == 503, body
        assert body["error"] == "limited"
        assert "2" in body["detail"]
    assert len(upstream.handshakes) == handshakes

    after = await _scrape(gw.number)
    for route in ("chat", "news"):
        assert _moved(before, after, "wsgateway_ws_handshakes_total", route=route, outcome="limited") == 1

    first.sendClose(1000)
    await first.closed
    await settle(lambda: gw.registry.total_active() == 1, "one WebSocket left")
    third = await ws_connect(gw.url("/v1/chat/ws"))
    assert third.state == OPEN
    await _drop_all(gw, second, third)
    await _close_all(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_max_websockets_limits_one_route_and_leaves_the_others_alone():
    """``max_websockets = 1`` on a route: its second WebSocket gets 503 ``limited``; another route still opens."""
    upstream, up_port, number = await _upstream()
    gw = await start_gateway(_two_routes(number, extra_chat="max_websockets = 1"))
    first = await ws_connect(gw.url("/v1/chat/ws"))
    before = await _scrape(gw.number)

    status, body = await _handshake(gw.number, "/v1/chat/ws")
    assert status == 503, body
    assert body["error"] == "limited"
    assert "chat" in body["detail"]
    other = await ws_connect(gw.url("/v1/news/ws"))
    assert other.state == OPEN

    after = await _scrape(gw.number)
    assert _moved(before, after, "wsgateway_ws_handshakes_total", route="chat", outcome="limited") == 1
    assert _moved(before, after, "wsgateway_ws_handshakes_total", route="news", outcome="limited") == 0
    await _drop_all(gw, first, other)
    await _close_all(gw, up_port)


# -- the Origin policy ---------------------------------------------------------------

EXACT = "https://app.example.com"
PATTERN = "https://*.example.com"

#: (case, allowed_origins, allow_null_origin, Origin header or None, allowed)
ORIGINS = [
    ("exact match", EXACT, None, "https://app.example.com", True),
    ("exact match in another case", EXACT, None, "https://APP.Example.com", True),
    ("another host", EXACT, None, "https://evil.example.com", False),
    ("another scheme", EXACT, None, "http://app.example.com", False),
    ("another port", EXACT, None, "https://app.example.com:8443", False),
    ("pattern: a subdomain", PATTERN, None, "https://chat.example.com", True),
    ("pattern: the bare domain", PATTERN, None, "https://example.com", False),
    ("pattern: a look-alike domain", PATTERN, None, "https://evilexample.com", False),
    ("pattern: a suffix trick", PATTERN, None, "https://chat.example.com.evil.net", False),
    ("pattern: another scheme", PATTERN, None, "http://chat.example.com", False),
    ("null under a list", EXACT, None, "null", False),
    ("null allowed explicitly", EXACT, True, "null", True),
    ("null under * by default", "*", None, "null", True),
    ("null refused explicitly under *", "*", False, "null", False),
    ("anything under *", "*", None, "https://anywhere.example.org", True),
    ("no Origin (not a browser)", EXACT, None, None, True),
]


@pytest.mark.parametrize(
    "allowed_origins, allow_null, origin, allowed",
    [case[1:] for case in ORIGINS],
    ids=[case[0] for case in ORIGINS],
)
@pytest_twisted.ensureDeferred
async def test_origin_policy_decides_before_any_upstream_contact(allowed_origins, allow_null, origin, allowed):
    """
    An allowed Origin opens the WebSocket; a refused one gets 403 JSON
    ``forbidden_origin`` and the upstream never even sees a TCP connection.
    """
    upstream, up_port, number = await _upstream()
    extra = f"allowed_origins = {allowed_origins}"
    if allow_null is not None:
        extra += f"\nallow_null_origin = {str(allow_null).lower()}"
    gw = await start_gateway(_two_routes(number, extra_chat=extra))
    headers = {"Origin": origin} if origin is not None else {}

    try:
        status, body = await _handshake(gw.number, "/v1/chat/ws", headers)
    finally:
        await _drop_all(gw)
        await settle(lambda: not upstream.open_protocols, "the upstream connection closed")
        await _close_all(gw, up_port)

    if allowed:
        assert status == 101, body
        assert len(upstream.handshakes) == 1
    else:
        assert status == 403, body
        assert body["error"] == "forbidden_origin"
        assert upstream.tcp_connections == 0


# -- readiness ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_when_health_checks_fail_a_routes_only_upstream():
    """
    ``/readyz`` is 200 while every route has a healthy instance. A failed
    connect does not take a route's only instance out (passive health keeps
    the last one: nothing to fail over to), so ``/readyz`` stays 200; once its
    health checks fail, ``/readyz`` answers 503 naming the route, while
    ``/healthz`` (the process is alive) stays 200.
    """
    upstream, up_port, number = await _upstream()
    dead = _closed_port()
    broken = f"[route:broken]\nprefix = /v1/broken\nupstream = http://127.0.0.1:{dead}\n"
    gw = await start_gateway(route_config(number) + broken + "health_check = /health\nhealth_interval = 0.1\n")
    assert await _get_json(gw.number, "/readyz") == (200, {"status": "ready"})

    status, body = await _handshake(gw.number, "/v1/broken/ws")
    assert status == 502 and body["error"] == "bad_gateway", body
    assert await _get_json(gw.number, "/readyz") == (200, {"status": "ready"})

    gw.gateway.startService()
    await settle(
        lambda: not any(i.state == "up" for i in gw.gateway.pools["broken"].instances),
        "the health checks to fail",
    )
    status, body = await _get_json(gw.number, "/readyz")
    assert status == 503, body
    assert body["status"] == "not_ready"
    assert "broken" in body["detail"]
    status, health = await _get_json(gw.number, "/healthz")
    assert status == 200 and health["status"] == "ok"
    await gw.gateway.stopService()
    await _drop_all(gw)
    await _close_all(gw, up_port)


# -- request head size -------------------------------------------------------------------


async def _site_gateway(max_header_size: int) -> tuple[Any, GatewayResource]:
    settings = parse_config(
        f"""
[gateway]
max_header_size = {max_header_size}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:1
"""
    )
    resource = build_gateway_resource(settings, reactor)
    return await listen(build_site(resource, settings)), resource


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Huge": "h" * 4000},
        {f"X-Many-{i}": "m" * 100 for i in range(20)},
    ],
    ids=["one huge header line", "many headers over the total"],
)
@pytest_twisted.ensureDeferred
async def test_a_request_head_over_max_header_size_gets_431_json(headers):
    """A head over ``max_header_size`` is refused with 431 and a JSON body, and the connection closes."""
    port, _ = await _site_gateway(1024)
    try:
        client = await raw_connect(port.getHost().port)
        client.transport.write(_request("/healthz", headers))
        lost = client.lost
        lost.addTimeout(GUARD, reactor)
        status, body = http_error(await lost)
    finally:
        await port.stopListening()
    assert status == 431
    assert body["error"] == "header_too_large"
    assert "1024" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_a_request_head_within_max_header_size_is_served():
    """The same gateway answers a request whose head fits."""
    port, _ = await _site_gateway(1024)
    try:
        status, body = await _get_json(port.getHost().port, "/healthz", {"X-Fits": "f" * 500})
    finally:
        await port.stopListening()
    assert status == 200 and body["status"] == "ok"
