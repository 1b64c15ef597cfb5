"""
Whole data frames pass through the relay as bytes, without Autobahn's
per-frame parsing: they must arrive exactly as before, and every frame the
gateway has to refuse must still be refused with the right close code.
"""

from __future__ import annotations

import os
import struct

import pytest
import pytest_twisted
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.testing import StringTransport

from tests.support import (
    UPGRADE,
    Upstream,
    close_relay,
    open_relay,
    raw_connect,
    server_frames,
    settle,
    ws_connect,
)
from tests.support import client_frame as frame
from twisted_gateway._compat import write_now
from twisted_gateway.ws_passthrough import unmask


async def _raw_client(gw):
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path="/v1/chat/ws").encode())
    head = await raw.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return raw


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 1024, 1025, 4096, 65537])
def test_unmask_matches_the_rfc_masking(size):
    """Masking is its own inverse and agrees with Autobahn's masker byte for byte."""
    key, payload = os.urandom(4), os.urandom(size)
    masked = unmask(payload, key)
    assert unmask(masked, key) == payload
    if size:
        assert masked == create_xor_masker(key, size).process(payload)


def test_write_now_keeps_twisteds_path_for_other_transports():
    """A transport that is not a plain TCP socket (TLS, a test double) gets a normal write."""
    transport = StringTransport()
    write_now(transport, b"one")
    write_now(transport, b"two")
    assert transport.value() == b"onetwo"


@pytest_twisted.ensureDeferred
async def test_a_burst_mixing_whole_frames_fragments_and_pings_arrives_in_order():
    """Whole messages, a fragmented one with a ping inside, and binary ones, in one write."""
    upstream, up_port, gw = await open_relay(Upstream(echo=False))
    raw = await _raw_client(gw)
    big = os.urandom(70_000)
    raw.transport.write(
        frame(0x1, b"first")
        + frame(0x2, b"\x00\xff")
        + frame(0x1, "caf\u00e9".encode()[:4], fin=False)
        + frame(0x9, b"are you there")
        + frame(0x0, "caf\u00e9".encode()[4:])
        + frame(0x1, b"")
        + frame(0x2, big)
        + frame(0x1, b"m" * 300)
        + frame(0x1, b"last")
    )
    server = upstream.connected[-1]
    expected = [
        (b"first", False),
        (b"\x00\xff", True),
        ("caf\u00e9".encode(), False),
        (b"", False),
        (big, True),
        (b"m" * 300, False),
        (b"last", False),
    ]
    for message in expected:
        assert await server.next_message() == message
    await raw.wait_for(b"are you there")
    assert (0xA, b"are you there") in server_frames(raw.received)
    server.sendMessage(b"back")
    await raw.wait_for(b"back")
    assert server_frames(raw.received)[-1] == (0x1, b"back")
    raw.transport.abortConnection()
    await close_relay(gw, up_port)


@pytest.mark.parametrize(
    "bad, code",
    [
        (frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),  # a surrogate
        (frame(0x1, b"ok", mask=None), 1002),  # clients must mask
        (frame(0x2, b"ok", rsv=1), 1002),  # no extension gives RSV1 a meaning
        (frame(0x3, b"ok"), 1002),  # a reserved opcode
        (frame(0x0, b"ok"), 1002),  # a continuation with nothing to continue
        (bytes([0x81, 0x80 | 126, 0, 5]) + b"\x00\x00\x00\x00hello", 1002),  # non-minimal length
    ],
    ids=["invalid-utf8", "unmasked", "rsv1", "reserved-opcode", "stray-continuation", "non-minimal-length"],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_frame_after_good_ones_closes_with_the_right_code(bad, code):
    """The good messages before it are delivered; the client gets the close code, the upstream 1001."""
    upstream, up_port, gw = await open_relay(Upstream(echo=False))
    raw = await _raw_client(gw)
    raw.transport.write(frame(0x1, b"one") + frame(0x2, b"two") + bad + frame(0x1, b"never"))
    server = upstream.connected[-1]
    assert await server.next_message() == (b"one", False)
    assert await server.next_message() == (b"two", True)

    def closes():
        return [p for op, p in server_frames(raw.received) if op == 0x8 and len(p) >= 2]

    await settle(closes)
    assert struct.unpack("!H", closes()[0][:2])[0] == code
    raw.transport.write(frame(0x8, closes()[0][:2]))  # the client's answer to the close
    assert (await server.closed)[0] == 1001
    assert not server.messages
    raw.transport.abortConnection()
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_failing_the_client_leg_closes_the_upstream_at_once():
    """The upstream gets 1001 while the failed client has not even answered the close."""
    upstream, up_port, gw = await open_relay(Upstream(echo=False))
    raw = await _raw_client(gw)
    raw.transport.write(frame(0x3, b"reserved opcode"))
    server = upstream.connected[-1]
    assert (await server.closed)[0] == 1001
    assert not raw.lost.called
    assert [op for op, _ in server_frames(raw.received)] == [0x8]
    raw.transport.abortConnection()
    await close_relay(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_many_messages_from_the_upstream_keep_their_order_and_count():
    """A burst of small and large messages from the upstream, counted once each."""
    upstream, up_port, gw = await open_relay(Upstream(echo=False))
    client = await ws_connect(gw.url("/v1/chat/ws"))
    server = upstream.connected[-1]
    sent = [(os.urandom(i * 37 % 3000), True) if i % 3 else (b"t" * (i * 37 % 3000), False) for i in range(500)]
    sent[250] = (b"w" * 200_000, True)
    for payload, binary in sent:
        server.sendMessage(payload, isBinary=binary)
    for payload, binary in sent:
        assert await client.next_message() == (payload, binary)
    flow = gw.gateway.metrics.flow("chat", "upstream_to_client")
    await settle(lambda: flow.messages == len(sent))
    assert flow.bytes == sum(len(p) for p, _ in sent)
    await close_relay(gw, up_port, client)
