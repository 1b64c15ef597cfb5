"""
The WebSocket relay through a real gateway on loopback, with Autobahn peers on
both sides (other stacks are in test_ws_stacks.py).
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol

from twisted_gateway.config import parse_config

from tests.support import (
    UPGRADE,
    Upstream,
    client_frame,
    close_relay,
    connections_to,
    http_error,
    later,
    left_to_the_collector,
    listen,
    open_relay,
    raw_connect,
    route_config,
    settle,
    start_gateway,
    start_service,
    ws_connect,
)

@pytest_twisted.ensureDeferred
async def test_upstream_receives_path_query_and_end_to_end_headers():
    """The upstream sees the normalised path, the query, the client's headers and X-Forwarded-*."""
    upstream, up_port, gw = await open_relay()
    client = await ws_connect(
        gw.url("/v1/chat/./x/../ws?room=a&token=t"),
        headers={
            "Cookie": "session=1",
            "Authorization": "Bearer abc",
            "User-Agent": "test-agent/1.0",
            "X-Auth-Subject": "mallory",
            "X-Forwarded-For": "6.6.6.6",
        },
    )
    request = upstream.handshakes[-1]
    assert request.path == "/v1/chat/ws"
    assert request.params == {"room": ["a"], "token": ["t"]}
    headers = request.headers
    assert headers["cookie"] == "session=1"
    assert headers["authorization"] == "Bearer abc"
    assert headers["user-agent"] == "test-agent/1.0"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"].startswith("127.0.0.1")
    assert "x-auth-subject" not in headers
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_origin_reaches_the_upstream():
    """A browser's Origin header goes upstream unchanged."""
    upstream, up_port, gw = await open_relay()
    client = await ws_connect(gw.url("/v1/chat/ws"), headers={"Origin": "https://chat.example"})
    assert upstream.handshakes[-1].origin == "https://chat.example"
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_subprotocol_chosen_by_upstream_reaches_the_client():
    """The client's offered subprotocols go upstream; the upstream's choice comes back."""
    upstream, up_port, gw = await open_relay(Upstream(subprotocol="chat.v2"))
    client = await ws_connect(gw.url("/v1/chat/ws"), protocols=["chat.v1", "chat.v2"])
    assert upstream.handshakes[-1].protocols == ["chat.v1", "chat.v2"]
    assert client.response.protocol == "chat.v2"
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_no_subprotocol_header_when_upstream_chose_none():
    """When the upstream picks no subprotocol the client's handshake has none either."""
    upstream, up_port, gw = await open_relay(Upstream(subprotocol=None))
    raw = await raw_connect(gw.number)
    raw.transport.write(
        UPGRADE.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: chat.v1\r\n\r\n")
        .format(path="/v1/chat/ws")
        .encode()
    )
    head = await raw.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-protocol" not in head.lower()
    raw.transport.abortConnection()
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_upstream_refusal_reaches_the_client_as_written():
    """An upstream that refuses with 403 (and no body) makes the gateway answer just that."""
    upstream, up_port, gw = await open_relay(Upstream(refuse=(403, "Members Only")))
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    answer = await raw.lost
    assert answer.startswith(b"HTTP/1.1 403 Members Only\r\n")
    assert answer.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_502_json():
    """No upstream listening: the handshake is answered 502 with a JSON body."""
    up_port = await listen(Upstream())
    dead = up_port.getHost().port
    await up_port.stopListening()
    gw = await start_gateway(route_config(dead))
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    status, body = http_error(await raw.lost)
    assert status == 502
    assert body["error"] == "bad_gateway"
    await gw.close()


class _Silent(Protocol):
    """Accepts TCP and never answers, like a hung upstream."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def connectionLost(self, reason) -> None:
        self.factory.lost.append(self)


def _silent_factory() -> Factory:
    f = Factory.forProtocol(_Silent)
    f.connections, f.lost = [], []
    return f


@pytest_twisted.ensureDeferred
async def test_silent_upstream_is_504_json_after_ws_open_timeout():
    """An upstream that never completes its handshake: 504 JSON, upstream connection closed."""
    silent = _silent_factory()
    up_port = await listen(silent)
    gw = await start_gateway(
        route_config(up_port.getHost().port).replace("ws_open_timeout = 5", "ws_open_timeout = 0.3")
    )
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    status, body = http_error(await raw.lost)
    assert status == 504
    assert body["error"] == "gateway_timeout"
    await settle(lambda: len(silent.lost) == len(silent.connections) == 1)
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_handshake_cancels_the_upstream_attempt():
    """A client that leaves while the upstream is slow leaves nothing behind upstream."""
    silent = _silent_factory()
    up_port = await listen(silent)
    gw = await start_gateway(route_config(up_port.getHost().port))
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    await settle(lambda: len(silent.connections) == 1)
    raw.transport.loseConnection()
    await settle(lambda: len(silent.lost) == 1)
    assert not gw.registry.handshakes
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_upstream_lost_without_close_gives_client_1014():
    """An upstream that drops TCP without a close frame: the client gets 1014."""
    upstream, up_port, gw = await open_relay()
    client = await ws_connect(gw.url("/v1/chat/ws"))
    upstream.connected[-1].transport.abortConnection()
    code, reason = await client.closed
    assert code == 1014
    assert reason
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_client_lost_without_close_gives_upstream_1001():
    """A client that drops TCP without a close frame: the upstream gets 1001."""
    upstream, up_port, gw = await open_relay()
    client = await ws_connect(gw.url("/v1/chat/ws"))
    server = upstream.connected[-1]
    client.transport.abortConnection()
    code, _ = await server.closed
    assert code == 1001
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream():
    """A client that stops reading makes the gateway stop reading the upstream."""
    upstream, up_port, gw = await open_relay(Upstream(echo=False))
    client = await ws_connect(gw.url("/v1/chat/ws"))
    server = upstream.connected[-1]
    client.transport.pauseProducing()
    [gateway_leg] = connections_to(up_port.getHost().port)
    chunk = b"z" * 65536
    sent = 0
    # The upstream writes until the gateway stops reading its leg;
    # with no backpressure it would write all 64 MiB.
    while sent < 64 * 1024 * 1024 and gateway_leg in reactor.getReaders():
        server.sendMessage(chunk, isBinary=True)
        sent += len(chunk)
        if sent % (1024 * 1024) == 0:
            await task.deferLater(reactor, 0.01, lambda: None)
    assert sent < 64 * 1024 * 1024, "the gateway kept reading from the upstream"
    client.transport.resumeProducing()
    received = 0
    while received < sent:
        payload, _ = await client.next_message()
        received += len(payload)
    assert received == sent
    await close_relay(gw, up_port, client)


@pytest_twisted.ensureDeferred
async def test_firefox_handshake_and_fragmented_frames_from_a_raw_client():
    """Firefox's ``Connection: keep-alive, Upgrade`` upgrades; a fragmented text message is reassembled."""
    upstream, up_port, gw = await open_relay()
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    head = await raw.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    raw.transport.write(
        client_frame(0x1, b"Hel", fin=False) + client_frame(0x0, b"lo, ", fin=False) + client_frame(0x0, b"world")
    )
    server = upstream.connected[-1]
    data = await raw.wait_for(b"world")
    assert data.endswith(b"\x81\x0cHello, world")
    raw.transport.write(client_frame(0x8, b"\x03\xe8"))
    await server.closed
    raw.transport.loseConnection()
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_a_websocket_is_freed_without_the_cycle_collector(later):  # noqa: F811 (later: a fixture)
    """
    Once both legs are gone, nothing the gateway made for a WebSocket (the
    HTTP channel and request it came in on, the legs, the pair, the upstream
    connection's attempt) is left in a reference cycle: whether the client or
    the upstream closed or dropped it, or the upstream refused it.
    """
    upstream = Upstream()
    up_port = await listen(upstream)
    later(up_port.stopListening)
    service, port = await start_service(later, parse_config(route_config(up_port.getHost().port)))
    registry = service.gateway.registry
    url = f"ws://127.0.0.1:{port}/v1/chat/ws"

    async def websockets() -> None:
        for end in ("client closes", "client drops", "upstream drops", "upstream refuses"):
            upstream.refuse = (404, "Not Found") if end == "upstream refuses" else None
            try:
                client = await ws_connect(url)
            except ConnectionError:
                continue
            if end == "client closes":
                client.sendClose(1000)
            elif end == "client drops":
                client.transport.abortConnection()
            else:
                upstream.connected[-1].transport.abortConnection()
            await client.closed
        await settle(lambda: not registry.total_active() and not registry.handshakes, "both legs of each gone")

    assert await left_to_the_collector(websockets) == set()


@pytest_twisted.ensureDeferred
async def test_many_open_close_cycles_leave_nothing_behind():
    """Clean closes, client drops, upstream drops and refusals: every pair is cleaned up."""
    upstream, up_port, gw = await open_relay()
    refusing = Upstream(refuse=(404, "Not Found"))
    refuse_port = await listen(refusing)
    gw_refuse = await start_gateway(route_config(refuse_port.getHost().port))
    for i in range(40):
        client = await ws_connect(gw.url("/v1/chat/ws"))
        kind = i % 3
        if kind == 0:
            client.sendClose(1000)
        elif kind == 1:
            client.transport.abortConnection()
        else:
            upstream.connected[-1].transport.abortConnection()
        await client.closed
        try:
            await ws_connect(gw_refuse.url("/v1/chat/ws"))
        except ConnectionError:
            pass
    await settle(lambda: len(gw.registry) == 0 and not upstream.open_protocols)
    assert not gw.registry.handshakes
    await close_relay(gw, up_port)
    await close_relay(gw_refuse, refuse_port)

