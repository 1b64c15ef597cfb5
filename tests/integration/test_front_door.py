"""
The front door on loopback sockets: a GatewayService's connection cap with
real WebSocket and raw HTTP clients, and the slow-client timers on a real
listener (short values).
"""

from __future__ import annotations

from tests.support import Upstream, http_error, later, listen, raw_connect, settle, start_service, ws_connect  # noqa: F401 (later: a fixture)
from twisted_gateway.config import parse_config
from twisted_gateway.service import GatewayService

GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def gateway_service(later, gateway: str = "") -> tuple[GatewayService, int]:
    """A GatewayService on a loopback port in front of an Autobahn upstream; ``later`` stops both."""
    up_port = await listen(Upstream())
    later(up_port.stopListening)
    upstream_port = up_port.getHost().port
    settings = parse_config(
        f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
ws_open_timeout = 5
{gateway}

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
"""
    )
    return await start_service(later, settings)


async def test_a_websocket_keeps_its_slot_after_the_hand_over_and_frees_it_on_close(later):
    service, port = await gateway_service(later)
    client = await ws_connect(f"ws://127.0.0.1:{port}/v1/chat/ws")
    await client.opened
    client.sendMessage(b"counted")
    assert await client.next_message() == (b"counted", False)
    assert service.front_door.open == 1
    client.sendClose(1000)
    await client.closed
    await settle(lambda: service.front_door.open == 0, "the slot freed")


async def test_past_the_cap_a_client_gets_503_overloaded_and_the_first_one_keeps_working(later):
    service, port = await gateway_service(later, "max_client_connections = 1")
    first = await raw_connect(port)
    await settle(lambda: service.front_door.open == 1, "the first client counted")
    second = await raw_connect(port)
    refused = await second.lost
    status, body = http_error(refused)
    assert (status, body["error"]) == (503, "overloaded")
    first.transport.write(GET)
    answer = await first.wait_for(b"}\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert service.gateway.metrics.connections_refused == 1
    first.transport.loseConnection()
    await first.lost
    await settle(lambda: service.front_door.open == 0, "the slot freed")
    again = await raw_connect(port)
    again.transport.write(GET)
    assert (await again.wait_for(b"}\n")).startswith(b"HTTP/1.1 200 ")
    again.transport.loseConnection()
    await again.lost


async def test_a_trickled_head_gets_408_on_a_real_listener(later):
    _, port = await gateway_service(later, "client_header_timeout = 0.5")
    client = await raw_connect(port)
    client.transport.write(b"GET /healthz HTTP/1.1\r\n")
    received = await client.lost
    status, body = http_error(received)
    assert (status, body["error"]) == (408, "header_timeout")


async def test_pipelined_requests_are_answered_in_order_and_a_smuggling_head_ends_the_connection(later):
    """Two GETs and a head with both Transfer-Encoding and Content-Length, in one write."""
    _, port = await gateway_service(later)
    client = await raw_connect(port)
    smuggled = b"GET /v1/chat/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    client.transport.write(
        GET
        + GET
        + b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        + b"Content-Length: %d\r\n\r\n0\r\n\r\n" % (len(smuggled) + 5)
        + smuggled
    )
    received = await client.lost
    first, second, refused = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and second.startswith(b"200 ")
    status, body = http_error(b"HTTP/1.1 " + refused)
    assert (status, body["error"]) == (400, "bad_request")


async def test_a_client_connection_has_tcp_nodelay_from_its_listener_and_sets_none_of_its_own(later, monkeypatch):
    """
    The gateway's listeners give TCP_NODELAY to every socket they accept: an
    HTTP connection has it without a ``setsockopt`` of its own, and is served.
    """
    import socket

    from twisted.internet import tcp

    asked: list[object] = []
    set_no_delay = tcp.Connection.setTcpNoDelay

    def recording(self, enabled):
        asked.append(self)
        return set_no_delay(self, enabled)

    monkeypatch.setattr(tcp.Connection, "setTcpNoDelay", recording)
    service, port = await gateway_service(later)
    client = await raw_connect(port)
    client.transport.write(GET)
    answer = await client.wait_for(b"}\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    (channel,) = service.site.open_connections()
    assert channel.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert channel.transport not in asked
    client.transport.loseConnection()
