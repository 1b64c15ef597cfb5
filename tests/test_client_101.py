"""
The upstream leg opens on a plain 101 (``_compat.open_on_plain_101``) exactly
as Autobahn's client ``processHandshake`` opens it on the same answer: the same
state, the same bytes written, the same outcome; every answer it does not take
(compression, anything Autobahn refuses) goes to Autobahn, which opens or fails
the leg as ever.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.support import route_config
from twisted_gateway import _compat
from twisted_gateway.testing import MemoryRelay

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
#: the leg's state that processHandshake leaves, compared both ways
STATE = (
    "http_response_data", "http_status_line", "http_headers", "websocket_protocol_in_use", "data", "state",
    "inside_message", "current_frame", "websocket_version", "wasNotCleanReason", "droppedByMe", "wasClean",
)
BASE = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {ACCEPT}"]
PING = b"\x89\x02hi"

# (name, head lines, bytes after the head, taken by open_on_plain_101)
CASES = [
    ("plain", BASE, b"", True),
    ("a frame after the head", BASE, PING, True),
    ("subprotocol offered", [*BASE, "Sec-WebSocket-Protocol: chat"], b"", True),
    ("empty subprotocol", [*BASE, "Sec-WebSocket-Protocol: "], b"", True),
    ("token lists", ["HTTP/1.1 101 OK", "Upgrade: WebSocket", "Connection: keep-alive, Upgrade", f"Sec-WebSocket-Accept: {ACCEPT}"], b"", True),
    ("other headers", [*BASE, "Server: x", "X-Thing: a", "X-Thing: b"], b"", True),
    ("subprotocol not offered", [*BASE, "Sec-WebSocket-Protocol: other"], b"", False),
    ("two subprotocols", [*BASE, "Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: chat"], b"", False),
    ("wrong accept", [*BASE[:3], "Sec-WebSocket-Accept: x3JJHMbDL1EzLkh9GBhXDw=="], b"", False),
    ("two accepts", [*BASE, f"Sec-WebSocket-Accept: {ACCEPT}"], b"", False),
    ("no accept", BASE[:3], b"", False),
    ("no upgrade", [BASE[0], *BASE[2:]], b"", False),
    ("upgrade not websocket", [BASE[0], "Upgrade: h2c", *BASE[2:]], b"", False),
    ("connection without upgrade", [*BASE[:2], "Connection: keep-alive", BASE[3]], b"", False),
    ("HTTP/1.0", ["HTTP/1.0 101 Switching Protocols", *BASE[1:]], b"", False),
    ("compression", [*BASE, "Sec-WebSocket-Extensions: permessage-deflate"], b"", False),
    ("bad header line", [*BASE, "Bad Header: x"], b"", False),
]


class _Transport(StringTransport):
    """A leg's transport in memory; a failed handshake's drop unregisters a producer it never had."""

    def unregisterProducer(self) -> None:
        self.producer = None


def _leg(relay: MemoryRelay):
    """A fresh upstream leg of the relay's route, its request written, its key known."""
    (pair,) = relay.registry.pairs
    leg = pair.upstream.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    leg.factory.protocols = ["chat"]
    transport = _Transport()
    leg.makeConnection(transport)
    leg.websocket_key = KEY
    transport.clear()
    return leg, transport


def _answer(lines: list[str], after: bytes, taken: list[bool] | None, monkeypatch) -> tuple[dict, bytes, bool, bool]:
    relay = MemoryRelay(route_config(9))
    relay.client("/v1/chat/ws")
    leg, transport = _leg(relay)
    relay.stop()
    if taken is None:
        monkeypatch.setattr("twisted_gateway.ws_proxy.open_on_plain_101", lambda leg, end: False)
    else:
        original = _compat.open_on_plain_101

        def recording(leg, end):
            taken.append(original(leg, end))
            return taken[-1]

        monkeypatch.setattr("twisted_gateway.ws_proxy.open_on_plain_101", recording)
    leg.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + after)
    monkeypatch.undo()
    state = {name: getattr(leg, name, "(unset)") for name in STATE}
    state["extensions"] = [type(e).__name__ for e in getattr(leg, "websocket_extensions_in_use", [])]
    return state, _unmasked(transport.value()), leg.handshake_ended, transport.disconnecting


def _unmasked(written: bytes) -> bytes:
    """What the leg wrote, its one short masked frame (if any) unmasked (the mask is random)."""
    if len(written) < 6 or not written[1] & 0x80:
        return written
    mask, payload = written[2:6], written[6:]
    return written[:2] + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(("lines", "after", "plain"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_101_opens_the_leg_as_autobahn_opens_it(monkeypatch, lines, after, plain):
    taken: list[bool] = []
    fast = _answer(lines, after, taken, monkeypatch)
    slow = _answer(lines, after, None, monkeypatch)
    assert taken == [plain]
    assert fast == slow
    if plain:
        assert fast[2] and fast[0]["state"] == _compat.WebSocketProtocol.STATE_OPEN
    if after == PING:
        assert fast[1] == b"\x8a\x82hi"  # the pong (its mask taken off)
