"""Stopping the gateway lets in-flight HTTP requests finish (the drain), in process."""

from __future__ import annotations

import socket

import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import Upstream, listen, settle, ws_connect
from twisted_gateway.config import parse_config
from twisted_gateway.gateway import build_gateway
from twisted_gateway.service import GatewayService


class SlowPage(Resource):
    """Answers each request only when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []
        self.arrived: Deferred = Deferred()

    def render_GET(self, request):
        self.waiting.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_an_http_request_in_flight_finishes_during_the_drain():
    """A request still waiting on its upstream when the gateway stops gets its full answer."""
    page = SlowPage()
    up_port = await listen(Site(page))
    settings = parse_config(
        f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
drain_timeout = 5
[route:api]
prefix = /api
upstream = http://127.0.0.1:{up_port.getHost().port}
websocket = false
"""
    )
    service = GatewayService(build_gateway(settings, reactor), reactor)
    service.privilegedStartService()
    service.startService()
    port = await service.listeners[0].when_listening()
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    answer = client.get(f"http://127.0.0.1:{port.getHost().port}/api/slow")
    await page.arrived
    with capturedLogs() as events:
        stopping = service.stopService()
        # The drain logs its closed listeners, then looks at what is in flight:
        # a drain that missed the request would have stopped by the next turn.
        await settle(lambda: any(e.get("event") == "drain" for e in events), "the drain started")
    assert not stopping.called, "the gateway stopped with a request in flight"
    request = page.waiting[0]
    request.write(b"finally")
    request.finish()
    response = await answer
    assert response.code == 200
    assert await response.content() == b"finally"
    await stopping
    await pool.closeCachedConnections()
    await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_websocket_opened_during_drain_delay_is_served_then_closed_with_1001_on_both_legs():
    """
    A handshake that arrives after the stop began but within ``drain_delay``
    opens a working WebSocket (no 503); once the delay is over the listener
    closes and both legs get 1001, and the stop completes.
    """
    upstream = Upstream()
    up_port = await listen(upstream)
    settings = parse_config(
        f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
drain_delay = 2
drain_timeout = 5
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{up_port.getHost().port}
"""
    )
    service = GatewayService(build_gateway(settings, reactor), reactor)
    service.privilegedStartService()
    service.startService()
    port = await service.listeners[0].when_listening()
    stopping = service.stopService()
    client = await ws_connect(f"ws://127.0.0.1:{port.getHost().port}/v1/chat/ws")
    upstream_leg = upstream.connected[0]
    client.sendMessage(b"during the delay")
    assert await client.next_message() == (b"during the delay", False)
    assert all(listener.running for listener in service.listeners)
    assert (await client.closed)[0] == 1001
    assert (await upstream_leg.closed)[0] == 1001
    await stopping
    assert not any(listener.running for listener in service.listeners)
    await up_port.stopListening()


async def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything a non-blocking socket receives until the peer closes (a reset raises)."""
    received = b""
    for _ in range(500):  # a guard against a hang, not a speed expectation
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            await task.deferLater(reactor, 0.02, lambda: None)
            continue
        if not data:
            return received
        received += data
    raise AssertionError(f"still open after {received!r}")


@pytest_twisted.ensureDeferred
async def test_requests_still_in_the_listen_queue_when_the_listener_closes_are_answered_not_reset():
    """
    Connections the kernel completed but the gateway had not yet accepted,
    each with its request already sent, when the stop closes the listener:
    every client gets its answer (with ``Connection: close``), none a reset.
    """
    settings = parse_config(
        """
[gateway]
listen = tcp:0:interface=127.0.0.1
[route:api]
prefix = /api
upstream = http://127.0.0.1:9
websocket = false
"""
    )
    service = GatewayService(build_gateway(settings, reactor), reactor)
    service.privilegedStartService()
    service.startService()
    port = (await service.listeners[0].when_listening()).getHost().port
    clients = []
    try:
        # No reactor turn between these connects and the stop: nothing is accepted yet.
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            client.setblocking(False)
            clients.append(client)
        stopping = service.stopService()
        answers = [await _read_until_closed(client) for client in clients]
        await stopping
    finally:
        for client in clients:
            client.close()
    for answer in answers:
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200 ") and b"\r\nconnection: close" in head, answer
