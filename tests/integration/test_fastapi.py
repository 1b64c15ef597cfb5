"""
FastAPI under uvicorn (both WebSocket backends) behind the gateway, compared
with a direct connection: the Host it sees and the redirects it builds from
it, and the bytes a compressing client puts on the wire.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.protocols import portforward

from tests.stacks import stop, uvicorn_server
from twisted_gateway.config import parse_config
from twisted_gateway.resource import build_gateway_resource
from twisted_gateway.site import build_site
from tests.support import Gateway, listen, raw_connect, settle, start_gateway


@pytest.fixture(scope="module", params=["websockets", "wsproto"])
def fastapi(request):
    process, port = uvicorn_server(request.param)
    yield port
    stop(process)


def config(port: int, host_header: str) -> str:
    return f"""
[route:fastapi]
prefix = /ws1
upstream = http://127.0.0.1:{port}
host_header = {host_header}
"""


async def get(port: int, path: str) -> tuple[bytes, bytes]:
    client = await raw_connect(port)
    client.transport.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n\r\n"
    )
    raw = await client.lost
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def location(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"location":
            return value.strip()
    return None


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host_header", ["client", "upstream", "internal.example"])
async def test_fastapi_sees_the_routes_host_and_redirects_the_client_to_its_own_host(fastapi, host_header):
    """FastAPI's trailing-slash redirect never sends a browser to the upstream's address."""
    gw = await start_gateway(config(fastapi, host_header))
    try:
        head, _ = await get(gw.number, "/ws1/echo?q=1")
        assert head.split(b" ")[1] == b"307"
        assert location(head) == b"http://chat.example.com/ws1/echo/?q=1"
        head, body = await get(gw.number, "/ws1/echo/")
        expected = {"client": "chat.example.com", "upstream": f"127.0.0.1:{fastapi}"}
        assert json.loads(body)["host"] == expected.get(host_header, host_header)
    finally:
        await gw.gateway.stopService()
        await gw.close()


class _CountingServer(portforward.ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        self.factory.sent += len(data)
        super().dataReceived(data)


class CountingHop(portforward.ProxyFactory):
    """A TCP hop in front of a server that counts the bytes the client sends through it."""

    protocol = _CountingServer
    noisy = False
    sent = 0


#: 1,000 chat messages as a chat front-end sends them.
MESSAGES = [
    json.dumps({"type": "message", "room": "lobby", "user": f"user{n % 7}", "text": f"hello, this is message {n}", "seq": n})
    for n in range(1000)
]


def chat(url: str) -> str:
    """The ``websockets`` client (offering ``permessage-deflate; client_max_window_bits``), echoed."""
    from websockets.sync.client import connect

    with connect(url, compression="deflate", open_timeout=20) as ws:
        for message in MESSAGES:
            ws.send(message)
            assert ws.recv(timeout=20) == message
        return ws.response.headers.get("Sec-WebSocket-Extensions", "")


async def bytes_sent(target_port: int, path: str) -> tuple[int, str]:
    hop = CountingHop("127.0.0.1", target_port)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(hop)
    try:
        extensions = await threads.deferToThread(chat, f"ws://127.0.0.1:{port.getHost().port}{path}")
    finally:
        await port.stopListening()
    return hop.sent, extensions


@pytest_twisted.ensureDeferred
async def test_compressed_chat_costs_the_same_bytes_as_a_direct_connection(fastapi):
    """Client-to-server bytes on the wire within 5 % of direct (context takeover kept)."""
    gw = await start_gateway(config(fastapi, "client"))
    try:
        direct, direct_extensions = await bytes_sent(fastapi, "/ws1/echo/")
        through, gateway_extensions = await bytes_sent(gw.number, "/ws1/echo/")
        await _settle_pairs(gw)
    finally:
        await gw.gateway.stopService()
        await gw.close()
    assert gateway_extensions == direct_extensions
    assert "permessage-deflate" in direct_extensions
    assert abs(through - direct) <= 0.05 * direct, (direct, through)


async def _settle_pairs(gw) -> None:
    await settle(lambda: not gw.registry.pairs, "the pair closed")


@pytest_twisted.ensureDeferred
async def test_fastapi_reads_a_streamed_upload_before_its_last_byte_is_sent(fastapi):
    """Under request_buffering = off the handler has the first 1 MB while the client holds the rest."""
    settings = parse_config(config(fastapi, "client") + "request_buffering = off\n")
    resource = build_gateway_resource(settings, reactor)
    port = await listen(build_site(resource, settings))
    gw = Gateway(port, resource)
    client = await raw_connect(gw.number)
    try:
        size, first = 3_000_000, 1_000_000
        client.transport.write(
            b"POST /ws1/upload/ HTTP/1.1\r\nHost: chat.example.com\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % size + b"a" * first
        )
        seen = []

        async def poll() -> bool:
            _, body = await get(gw.number, "/ws1/progress/")
            seen.append(json.loads(body)["received"])
            return seen[-1] == first

        for _ in range(500):  # a guard against a hang, not a speed limit
            if await poll():
                break
        assert seen[-1] == first, seen
        client.transport.write(b"b" * (size - first))
        answer = await client.lost
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"received": size}
    finally:
        if not client.lost.called:
            client.transport.abortConnection()
        await gw.gateway.stopService()
        await gw.close()
