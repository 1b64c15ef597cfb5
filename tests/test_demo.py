"""
The bundled chat-service over loopback, driven by real ``websockets`` and treq clients.

The ``websockets`` client is synchronous, so each of its calls runs in a thread
through ``deferToThread`` while the chat-service runs in the reactor.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import HTTPConnectionPool
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from twisted_gateway.demo.chat import ChatFactory, ChatProtocol, ChatService, build_chat_site

NOW = 1_700_000_000.25
TIMEOUT = 2.0


class ConnectionTracker(WrappingFactory):
    """Wraps the site so a test can wait until every server-side connection is gone."""

    noisy = False

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._waiting: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: IProtocol) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    async def all_closed(self) -> None:
        if self.protocols:
            d: Deferred[None] = Deferred()
            self._waiting.append(d)
            await d.addTimeout(TIMEOUT, reactor)


@dataclass
class ChatServer:
    """A listening chat-service and the clients a test opened against it."""

    address: str
    service: ChatService
    pool: HTTPConnectionPool
    clients: ExitStack = field(default_factory=ExitStack)

    async def join(self, room: str | None = None, subject: str | None = None) -> ClientConnection:
        query = "" if room is None else "?room=" + room
        headers = {} if subject is None else {"X-Auth-Subject": subject}

        def open_client() -> ClientConnection:
            return self.clients.enter_context(
                connect(
                    "ws://" + self.address + "/v1/chat/ws" + query,
                    additional_headers=headers,
                    proxy=None,
                    open_timeout=TIMEOUT,
                    close_timeout=TIMEOUT,
                    ping_interval=None,
                )
            )

        return await deferToThread(open_client)

    async def get(self, path: str) -> tuple[int, str, bytes]:
        response = await treq.get("http://" + self.address + path, pool=self.pool)
        body = await response.content()
        return response.code, response.headers.getRawHeaders("content-type")[0], body


async def say(ws: ClientConnection, text: str | bytes) -> None:
    await deferToThread(ws.send, text)


async def hear(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await deferToThread(ws.recv, TIMEOUT))


async def close(ws: ClientConnection) -> None:
    await deferToThread(ws.close)


@asynccontextmanager
async def chat_server() -> AsyncIterator[ChatServer]:
    """Run the chat-service on a loopback port with its clock at ``NOW``; clean up after."""
    clock = Clock()
    clock.advance(NOW)
    site = build_chat_site(clock)
    tracker = ConnectionTracker(site)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tracker)
    server = ChatServer(
        "127.0.0.1:%d" % port.getHost().port, site.chat_service, HTTPConnectionPool(reactor)
    )
    try:
        yield server
    finally:
        await deferToThread(server.clients.close)
        await server.pool.closeCachedConnections()
        await port.stopListening()
        await tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_everyone_in_the_room_hears_a_message_with_sender_and_time() -> None:
    """A message reaches every member of its room, the sender too, named by X-Auth-Subject."""
    async with chat_server() as server:
        alice = await server.join("alpha", subject="alice")
        bob = await server.join("alpha", subject="bob")
        await say(alice, "hello")
        expected = {"room": "alpha", "from": "alice", "text": "hello", "ts": NOW}
        assert await hear(alice) == expected
        assert await hear(bob) == expected


@pytest_twisted.ensureDeferred
async def test_other_rooms_do_not_hear_it() -> None:
    """A member of another room never receives the message."""
    async with chat_server() as server:
        alice = await server.join("alpha", subject="alice")
        carol = await server.join("beta", subject="carol")
        await say(alice, "only for alpha")
        assert (await hear(alice))["text"] == "only for alpha"
        # Anything carol had been sent would arrive before the echo of her own message.
        await say(carol, "only for beta")
        assert await hear(carol) == {
            "room": "beta", "from": "carol", "text": "only for beta", "ts": NOW,
        }


@pytest_twisted.ensureDeferred
async def test_without_room_or_subject_a_client_is_anonymous_in_the_lobby() -> None:
    """No ?room= means the lobby; no X-Auth-Subject means "anonymous"."""
    async with chat_server() as server:
        guest = await server.join()
        await say(guest, "hi")
        assert await hear(guest) == {"room": "lobby", "from": "anonymous", "text": "hi", "ts": NOW}


@pytest_twisted.ensureDeferred
async def test_handshake_accepts_deflate_and_picks_no_subprotocol() -> None:
    """Clients offering permessage-deflate get it; no subprotocol is chosen."""
    async with chat_server() as server:
        ws = await server.join("alpha")
        assert ws.subprotocol is None
        assert ws.response is not None
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")


@pytest_twisted.ensureDeferred
async def test_binary_message_is_refused_with_1003() -> None:
    """Sending binary closes the connection with 1003 (unsupported data)."""
    async with chat_server() as server:
        ws = await server.join("alpha")
        await say(ws, b"\x00\x01")
        with pytest.raises(ConnectionClosedError) as closed:
            await hear(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


@pytest_twisted.ensureDeferred
async def test_rooms_lists_occupied_rooms_by_name_with_member_counts() -> None:
    """GET /v1/chat/rooms counts members per room, sorted, and forgets emptied rooms."""
    async with chat_server() as server:
        beta = await server.join("beta")
        await server.join("alpha")
        await server.join("alpha")
        code, content_type, body = await server.get("/v1/chat/rooms")
        assert (code, content_type) == (200, "application/json")
        assert json.loads(body) == {
            "rooms": [{"room": "alpha", "members": 2}, {"room": "beta", "members": 1}],
        }
        await close(beta)
        _, _, body = await server.get("/v1/chat/rooms")
        assert json.loads(body) == {"rooms": [{"room": "alpha", "members": 2}]}


@pytest_twisted.ensureDeferred
async def test_connections_are_released_when_clients_close() -> None:
    """open_connections() counts open clients and falls back to 0 once they close."""
    async with chat_server() as server:
        clients = [await server.join("alpha"), await server.join("beta")]
        assert server.service.open_connections() == 2
        for ws in clients:
            await close(ws)
        assert server.service.open_connections() == 0
        assert server.service.rooms() == []


@pytest.mark.parametrize(
    "name, content_type, marker",
    [
        # the page connects with ws: or wss: like its own URL
        ("", "text/html; charset=utf-8", b"window.location.protocol === 'https:' ? 'wss:' : 'ws:'"),
        # an ES module the page imports (and any frontend may)
        ("wsgateway-client.js", "text/javascript; charset=utf-8", b"export class GatewaySocket"),
    ],
    ids=["page", "client module"],
)
@pytest_twisted.ensureDeferred
async def test_the_page_and_its_client_module_are_served_at_root_and_under_chat(name, content_type, marker) -> None:
    async with chat_server() as server:
        for path in (f"/{name}", f"/v1/chat/{name}"):
            code, served_as, body = await server.get(path)
            assert (code, served_as) == (200, content_type)
            assert marker in body


class _Member(ChatProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        if self.state != self.STATE_OPEN:
            raise AssertionError("sent on a connection that is not open")
        self.sent.append(payload)


def test_a_member_whose_close_has_begun_is_skipped_and_the_sender_keeps_talking() -> None:
    """Autobahn raises on a send to a closing connection: it would drop the sender, not the leaver."""
    service = ChatService()
    factory = ChatFactory(service, Clock())
    staying, leaving = _Member(), _Member()
    for member, state in ((staying, ChatProtocol.STATE_OPEN), (leaving, ChatProtocol.STATE_CLOSING)):
        member.factory, member.state = factory, state
        service.join("lobby", member)
    staying.onMessage(b"hello", False)
    assert [json.loads(m)["text"] for m in staying.sent] == ["hello"]
    assert leaving.sent == []
