"""
A small Autobahn chat-service for the gateway to proxy to.

It is an ordinary upstream that knows nothing about the gateway: it trusts the
``X-Auth-Subject`` header the gateway adds, speaks no subprotocol and accepts
permessage-deflate, so it exercises the WebSocket and HTTP paths as any real
service would. ``build_chat_site`` returns a ``Site`` to listen with anywhere.
"""

from __future__ import annotations

import json
from importlib.resources import files

from autobahn.twisted.resource import WebSocketResource
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import Interface, implementer

from twisted_gateway._bases import Resource, Site, WebSocketServerFactory, WebSocketServerProtocol
from twisted_gateway.demo.echo import CLOSE_HANDSHAKE_TIMEOUT, accept_deflate

DEFAULT_ROOM = "lobby"
ANONYMOUS = "anonymous"
MAX_MESSAGE_BYTES = 64 * 1024
#: The reconnecting browser client the page uses (usable by any frontend).
CLIENT_MODULE = "wsgateway-client.js"

log = Logger()


class IChatMember(Interface):
    """Someone in a room, who can be handed the room's messages."""

    def deliver(message: str) -> None:
        """Send one JSON-encoded chat message to this member."""


class ChatService:
    """Room membership and broadcast, independent of the network."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[IChatMember, None]] = {}  # members in join order

    def join(self, room: str, member: IChatMember) -> None:
        """Add ``member`` to ``room``; it receives the room's messages from now on."""
        self._rooms.setdefault(room, {})[member] = None

    def leave(self, room: str, member: IChatMember) -> bool:
        """Remove ``member`` from ``room``; say whether it was there. Empty rooms vanish."""
        members = self._rooms.get(room, {})
        if member not in members:
            return False
        del members[member]
        if not members:
            del self._rooms[room]
        return True

    def broadcast(self, room: str, sender: str, text: str, ts: float) -> None:
        """Deliver one message to every member of ``room``, the sender included."""
        message = json.dumps({"room": room, "from": sender, "text": text, "ts": ts})
        for member in list(self._rooms.get(room, {})):
            member.deliver(message)

    def rooms(self) -> list[dict[str, str | int]]:
        """The rooms that have members, sorted by name, with their member counts."""
        return [
            {"room": name, "members": len(members)}
            for name, members in sorted(self._rooms.items())
        ]

    def open_connections(self) -> int:
        """How many WebSocket connections are open (each is in exactly one room)."""
        return sum(len(members) for members in self._rooms.values())


@implementer(IChatMember)
class ChatProtocol(WebSocketServerProtocol):
    """One chat connection: joins its room when open, leaves it when closed."""

    factory: ChatFactory
    room: str = DEFAULT_ROOM
    subject: str = ANONYMOUS

    def onConnect(self, request: ConnectionRequest) -> None:
        """Pick the room and the sender name; accept with no subprotocol."""
        self.room = request.params.get("room", [""])[0] or DEFAULT_ROOM
        self.subject = request.headers.get("x-auth-subject") or ANONYMOUS
        return None

    def onOpen(self) -> None:
        """Join the room chosen in the handshake."""
        self.factory.chat_service.join(self.room, self)
        log.debug("{subject} joined {room}", subject=self.subject, room=self.room)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Broadcast text to the room; refuse binary by closing with 1003."""
        if isBinary:
            self.sendCloseFrame(
                code=WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA,
                reasonUtf8=b"text messages only",
            )
            return
        self.factory.chat_service.broadcast(
            self.room, self.subject, payload.decode("utf-8"), self.factory.clock.seconds()
        )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Leave the room (a connection that never opened was never in it)."""
        if self.factory.chat_service.leave(self.room, self):
            log.debug(
                "{subject} left {room} ({code})", subject=self.subject, room=self.room, code=code
            )

    def deliver(self, message: str) -> None:
        """
        Send a room message to this client as text. A member whose close has
        begun is still in the room until its ``onClose``; sending to it would
        raise in the *sender's* ``onMessage`` and drop the sender.
        """
        if self.state == self.STATE_OPEN:
            self.sendMessage(message.encode("utf-8"), isBinary=False)


class ChatFactory(WebSocketServerFactory):
    """Builds ``ChatProtocol``s that share one ``ChatService`` and one clock."""

    protocol = ChatProtocol  # type: ignore[assignment]  # its factory is ours, not a Factory[Self]
    noisy = False

    def __init__(self, chat_service: ChatService, clock: IReactorTime) -> None:
        super().__init__(reactor=clock)
        self.chat_service = chat_service
        self.clock = clock
        self.setProtocolOptions(
            perMessageCompressionAccept=accept_deflate,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            webStatus=False,  # a plain GET gets 426, not a status page
            allowNullOrigin=True,  # setProtocolOptions would reset it; the gateway decides
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,  # (echo.py says why)
        )


def _body(request: Request, body: bytes) -> bytes:
    """``body``, or nothing for a HEAD request (which ``render_GET`` also serves)."""
    return b"" if request.method == b"HEAD" else body


class RoomsResource(Resource):
    """``GET /v1/chat/rooms``: the rooms that have members, as JSON."""

    isLeaf = True

    def __init__(self, chat_service: ChatService) -> None:
        super().__init__()
        self._chat_service = chat_service

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        rooms = json.dumps({"rooms": self._chat_service.rooms()})
        return _body(request, rooms.encode("utf-8"))


class PageResource(Resource):
    """One fixed document: the demo page or its client module."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes = b"text/html; charset=utf-8") -> None:
        super().__init__()
        self._body, self._content_type = body, content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        return _body(request, self._body)


class ChatSite(Site):
    """The chat-service's ``Site``, exposing its ``ChatService``."""

    noisy = False
    chat_service: ChatService


def _access_line(timestamp: str, request: Request) -> str:
    """An access-log line without the query string, which may carry ``?token=``."""
    path = request.path.decode("ascii", "backslashreplace")
    method = request.method.decode("ascii", "backslashreplace")
    return f'{timestamp} "{method} {path}" {request.code} {request.sentLength}'


def build_chat_site(clock: IReactorTime, service: ChatService | None = None) -> ChatSite:
    """
    Build the chat-service: the page at ``/`` and ``/v1/chat/`` (its client
    module next to it, ``wsgateway-client.js``), the room list
    at ``/v1/chat/rooms`` and WebSocket rooms at ``/v1/chat/ws?room=NAME``.
    """
    chat_service = ChatService() if service is None else service
    demo = files("twisted_gateway.demo")
    page = PageResource(demo.joinpath("index.html").read_bytes())
    client = PageResource(demo.joinpath(CLIENT_MODULE).read_bytes(), b"text/javascript; charset=utf-8")

    chat = Resource()
    chat.putChild(b"", page)
    chat.putChild(b"rooms", RoomsResource(chat_service))
    chat.putChild(CLIENT_MODULE.encode(), client)
    chat.putChild(b"ws", WebSocketResource(ChatFactory(chat_service, clock)))
    v1 = Resource()
    v1.putChild(b"chat", chat)
    root = Resource()
    root.putChild(b"", page)
    root.putChild(CLIENT_MODULE.encode(), client)
    root.putChild(b"v1", v1)

    site = ChatSite(root, logFormatter=_access_line, reactor=clock)
    site.chat_service = chat_service
    return site
