"""
The relay between peers of another stack: the ``websockets`` library as client
and as upstream, so the gateway is never only tested against Autobahn.
"""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

from tests.support import Upstream, listen, route_config, start_gateway, ws_connect


class WebsocketsUpstream:
    """A ``websockets`` echo server in a thread; closes with 4001 on the text "bye"."""

    def __init__(self, subprotocols=None) -> None:
        self.requests: list = []
        self.closes: list = []
        self.server = serve(
            self._handler, "127.0.0.1", 0, subprotocols=subprotocols, compression="deflate"
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self, ws) -> None:
        self.requests.append(ws.request)
        try:
            for message in ws:
                if message == "bye":
                    ws.close(4001, "upstream says bye")
                    break
                ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


def _client_session(url: str, outgoing: list, subprotocols=None, close=None) -> dict:
    with connect(url, subprotocols=subprotocols, compression="deflate", open_timeout=5) as ws:
        result = {
            "subprotocol": ws.subprotocol,
            "extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
            "echo": [],
        }
        for message in outgoing:
            ws.send(message)
            result["echo"].append(ws.recv(timeout=5))
        if close:
            ws.close(*close)
        else:
            ws.send("bye")
            try:
                ws.recv(timeout=5)
            except ConnectionClosed:
                pass
        result["close"] = (ws.close_code, ws.close_reason)
    return result


@pytest_twisted.ensureDeferred
async def test_websockets_client_and_upstream_through_the_gateway():
    """Messages, the subprotocol, compression and the upstream's close cross between two websockets peers."""
    upstream = WebsocketsUpstream(subprotocols=["chat.v1"])
    try:
        gw = await start_gateway(route_config(upstream.port))
        messages = ["hello", b"\x00\xffbinary", "", "x" * 200_000]
        result = await deferToThread(
            _client_session, gw.url("/v1/chat/ws?room=r"), messages, ["chat.v1"]
        )
        assert result["echo"] == messages
        assert result["subprotocol"] == "chat.v1"
        assert "permessage-deflate" in result["extensions"]
        assert result["close"] == (4001, "upstream says bye")
        assert upstream.requests[0].path == "/v1/chat/ws?room=r"
        await gw.close()
    finally:
        await deferToThread(upstream.stop)


@pytest_twisted.ensureDeferred
async def test_websockets_client_close_reaches_autobahn_upstream():
    """A websockets client's close code reaches an Autobahn upstream through the gateway."""
    upstream = Upstream()
    up_port = await listen(upstream)
    gw = await start_gateway(route_config(up_port.getHost().port))
    connected = upstream.next_connection()
    result = await deferToThread(
        _client_session, gw.url("/v1/chat/ws"), ["one", b"two"], None, (4200, "client done")
    )
    assert result["echo"] == ["one", b"two"]
    server = await connected
    assert await server.closed == (4200, "client done")
    await gw.close()
    await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_autobahn_client_to_websockets_upstream_without_compression():
    """An Autobahn client that offers no compression gets none, and messages still cross."""
    upstream = WebsocketsUpstream()
    try:
        gw = await start_gateway(route_config(upstream.port))
        client = await ws_connect(gw.url("/v1/chat/ws"))
        assert client.websocket_extensions_in_use == []
        client.sendMessage("caf\u00e9".encode())
        assert await client.next_message() == ("caf\u00e9".encode(), False)
        client.sendMessage(b"bye")
        assert await client.closed == (4001, "upstream says bye")
        await gw.close()
    finally:
        await deferToThread(upstream.stop)
