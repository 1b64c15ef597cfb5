"""
The relay's pairing, closes, limits, pings and rate limit, in memory
(twisted_gateway.testing: iosim pumps on a MemoryReactorClock): a raw client
writing frames byte for byte, an Autobahn upstream. What needs real sockets
(TCP resets, the kernel's buffers, TLS, handshake timing) stays in
tests/integration/test_ws_relay.py.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError

from tests.support import route_config
from twisted_gateway import ws_pair
from twisted_gateway.testing import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    MemoryNetwork,
    MemoryRelay,
    RecordingUpstream,
    RecordingUpstreamProtocol,
    close_code,
    frame,
)
from twisted_gateway.ws_pair import HandshakeContext

MASK = b"\x0f\x1e\x2d\x3c"


def config(extra_gateway: str = "") -> str:
    return route_config(9, extra_gateway)


def open_pair(extra_gateway: str = "", upstream: RecordingUpstream | None = None):
    relay = MemoryRelay(config(extra_gateway), upstream)
    client = relay.client("/v1/chat/ws")
    assert client.head.startswith(b"HTTP/1.1 101 ")
    assert len(relay.registry.pairs) == 1
    return relay, client, relay.upstream.connections[-1]


def closes(client) -> list[tuple[int | None, bytes]]:
    return [(close_code(p), p[2:]) for op, _, p in client.frames if op == OP_CLOSE]


def assert_nothing_left(relay: MemoryRelay) -> None:
    relay.flush()
    assert not relay.registry.pairs and not relay.registry.handshakes
    assert relay.registry.total_active() == 0


def test_messages_keep_type_boundaries_and_order_both_ways():
    """Text stays text, binary stays binary, empty and large messages pass, in order."""
    relay, client, server = open_pair()
    sent = [
        (b"hello", False),
        (b"", False),
        (b"\x00\x01\xff", True),
        (b"", True),
        ("caf\u00e9 \u2603".encode(), False),
        (b"x" * 300_000, True),
        (b"y" * 70_000, False),
    ]
    for payload, binary in sent:
        client.send(frame(OP_BINARY if binary else OP_TEXT, payload, mask=MASK))
    relay.flush()
    assert server.messages == sent
    echoed = [(p, op == OP_BINARY) for op, _, p in client.frames]
    # the large echoes stream back in frames: join them into messages
    messages, current = [], None
    for op, fin, payload in client.frames:
        if op in (OP_TEXT, OP_BINARY):
            current = [payload, op == OP_BINARY]
        else:
            current[0] += payload
        if fin:
            messages.append(tuple(current))
    assert messages == sent, echoed[:3]
    client.send(frame(OP_CLOSE, b"\x03\xe8", mask=MASK))
    assert_nothing_left(relay)


CLOSE_CODES = [1000, 1001, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4999]


@pytest.mark.parametrize("code", CLOSE_CODES)
def test_client_close_code_and_reason_reach_the_upstream(code):
    """Every code a client may legally send reaches the upstream with its reason."""
    relay, client, server = open_pair()
    client.send(frame(OP_CLOSE, code.to_bytes(2, "big") + b"bye %d" % code, mask=MASK))
    relay.flush()
    assert server.close_received == (code, f"bye {code}")
    assert len(closes(client)) == 1  # the upstream's reply, relayed
    assert client.closed
    assert_nothing_left(relay)


@pytest.mark.parametrize("code", CLOSE_CODES)
def test_upstream_close_code_and_reason_reach_the_client(code):
    """Every code an upstream may legally send reaches the client with its reason."""
    relay, client, server = open_pair()
    server.sendCloseFrame(code, b"up %d" % code)
    relay.flush()
    assert closes(client) == [(code, b"up %d" % code)]
    client.send(frame(OP_CLOSE, code.to_bytes(2, "big"), mask=MASK))
    relay.flush()
    assert server.close_received is not None  # the gateway answered the upstream's close
    assert_nothing_left(relay)


@pytest.mark.parametrize("code", [999, 1005, 1016, 2999, 5000])
def test_invalid_close_code_is_not_relayed(code):
    """A client's illegal close code fails its own leg; the upstream gets 1001, never the bad code."""
    relay, client, server = open_pair()
    client.send(frame(OP_CLOSE, code.to_bytes(2, "big") + b"bad", mask=MASK))
    relay.flush()
    assert server.close == (1001, "going away")
    assert closes(client)[0][0] == 1002
    assert_nothing_left(relay)


def test_upstream_lost_without_close_gives_client_1014():
    """An upstream whose connection ends without a close frame: the client gets 1014."""
    relay, client, server = open_pair()
    server.transport.loseConnection()
    relay.flush()
    assert closes(client)[0][0] == 1014


def test_client_lost_without_close_gives_upstream_1001():
    """A client whose connection ends without a close frame: the upstream gets 1001."""
    relay, client, server = open_pair()
    client.transport.loseConnection()
    relay.flush()
    assert server.close[0] == 1001
    assert_nothing_left(relay)


def test_oversize_message_closes_sender_1009_and_other_side_1001():
    """A message over ws_max_message_size: its sender gets 1009, the upstream 1001."""
    relay, client, server = open_pair("ws_max_message_size = 1000")
    client.send(frame(OP_BINARY, b"x" * 1000, mask=MASK))  # exactly the limit passes
    relay.flush()
    assert client.frames == [(OP_BINARY, True, b"x" * 1000)]
    client.send(frame(OP_BINARY, b"x" * 1001, mask=MASK))
    relay.flush()
    assert closes(client)[0][0] == 1009
    assert server.close[0] == 1001


def test_oversize_fragmented_message_closes_sender_1009():
    """The limit counts a fragmented message's running total."""
    relay, client, server = open_pair("ws_max_message_size = 1000")
    client.send(frame(OP_TEXT, b"a" * 600, fin=False, mask=MASK))
    client.send(frame(OP_CONTINUATION, b"b" * 600, mask=MASK))
    relay.flush()
    assert closes(client)[0][0] == 1009
    assert server.close[0] == 1001
    assert server.messages == []


def test_oversize_message_from_upstream_closes_it_1009_and_client_1001():
    """The limit holds the other way round too."""
    relay, client, server = open_pair("ws_max_message_size = 1000")
    server.sendMessage(b"y" * 5000)
    relay.flush()
    assert server.close[0] == 1009
    assert closes(client)[0][0] == 1001


class _SilentOnClose(RecordingUpstreamProtocol):
    """An upstream that never answers a close frame, and keeps the connection."""

    def onCloseFrame(self, code, reasonRaw):
        self.close_received = (code, None)


class _NeverDrops(RecordingUpstreamProtocol):
    """An upstream that answers a close frame but never drops the connection."""

    def onCloseFrame(self, code, reasonRaw):
        self.close_received = (code, None)
        self.sendCloseFrame(code, isReply=True)


@pytest.mark.parametrize(
    "protocol, overdue",
    [(_SilentOnClose, "wasCloseHandshakeTimeout"), (_NeverDrops, "wasServerConnectionDropTimeout")],
)
def test_an_upstream_that_does_not_finish_the_close_is_dropped_5s_later(protocol, overdue):
    """
    The client's close reaches the upstream; an upstream that never answers it,
    or answers but never drops the connection, is dropped 5 s later (as
    Autobahn's closeHandshakeTimeout and serverConnectionDropTimeout did).
    """
    upstream = RecordingUpstream()
    upstream.protocol = protocol
    relay, client, server = open_pair(upstream=upstream)
    (pair,) = relay.registry.pairs
    leg = pair.upstream
    client.send(frame(OP_CLOSE, b"\x03\xe8", mask=MASK))
    relay.flush()
    assert server.close_received == (1000, None) and client.closed
    relay.clock.advance(4.9)
    relay.flush()
    assert server.close is None and relay.registry.pairs
    relay.clock.advance(0.2)
    relay.flush()
    assert getattr(leg, overdue) and not leg.wasClean
    assert server.close is not None
    assert_nothing_left(relay)
    assert legs_timers(relay, pair) == []


def test_a_close_answered_in_time_leaves_no_timer_behind():
    """The upstream answers the client's close and drops: no close timer of either leg is left."""
    relay, client, server = open_pair()
    (pair,) = relay.registry.pairs
    client.send(frame(OP_CLOSE, b"\x03\xe8", mask=MASK))
    assert_nothing_left(relay)
    assert legs_timers(relay, pair) == []


def legs_timers(relay: MemoryRelay, pair) -> list:
    """The timers left on the clock that would call into either leg of ``pair`` (or Autobahn's batches)."""
    legs = (pair.client, pair.upstream)
    return [
        c for c in relay.clock.getDelayedCalls()
        if getattr(c.func, "__self__", None) in legs or getattr(c.func, "__name__", "") == "_notify_bucket"
    ]


def test_an_upstream_close_whose_reason_is_not_utf8_leaves_no_timer_behind():
    """It gets 1007; once the pair is gone no wait for the upstream's drop is left on the clock."""
    relay, client, server = open_pair()
    server.transport.write(b"\x88\x03\x03\xe8\xff")  # close 1000 with the reason b"\xff"
    relay.flush()
    assert server.close[0] == 1007
    waits = [c for c in relay.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "onServerConnectionDropTimeout"]
    assert [c for c in waits if c.active()] == []


def test_pings_are_answered_while_relaying_continues():
    """A ping from either peer gets a pong from the gateway; messages keep flowing."""
    relay, client, server = open_pair()
    pongs: list[bytes] = []
    server.onPong = pongs.append
    client.send(frame(OP_PING, b"c1", mask=MASK))
    server.sendPing(b"u1")
    client.send(frame(OP_TEXT, b"still here", mask=MASK))
    relay.flush()
    assert (OP_PONG, True, b"c1") in client.frames
    assert (OP_TEXT, True, b"still here") in client.frames
    assert pongs == [b"u1"]
    assert (OP_PING, True, b"u1") not in client.frames  # answered by the gateway, not relayed


def test_keepalive_drops_a_silent_client_and_closes_the_upstream_1011():
    """A client that answers no keepalive ping is dropped after ws_ping_timeout; the upstream gets 1011."""
    relay, client, server = open_pair("ws_ping_interval = 30\nws_ping_timeout = 10")
    relay.clock.advance(30)
    relay.flush()
    assert (OP_PING, True, b"wsgateway") in client.frames
    relay.clock.advance(10)
    relay.flush()
    assert server.close == (1011, "peer unresponsive")
    assert client.closed
    assert_nothing_left(relay)


def test_keepalive_keeps_a_client_that_answers():
    relay, client, server = open_pair("ws_ping_interval = 30\nws_ping_timeout = 10")
    for _ in range(3):
        relay.clock.advance(30)
        relay.flush()
        client.send(frame(OP_PONG, b"wsgateway", mask=MASK))
        relay.flush()
        relay.clock.advance(10)
        relay.flush()
    assert server.close is None and not client.closed


def test_client_over_ws_rate_limit_is_closed_1008_on_both_legs():
    """Past its burst, a client sending faster than ws_rate_limit gets 1008, and so does the upstream."""
    relay, client, server = open_pair("ws_rate_limit = 2\nws_rate_burst = 3")
    calm = relay.client("/v1/chat/ws?room=calm")
    calm_server = relay.upstream.connections[-1]
    for i in range(3):
        client.send(frame(OP_TEXT, b"m%d" % i, mask=MASK))
    relay.flush()
    relay.clock.advance(0.5)  # one more message's worth
    client.send(frame(OP_TEXT, b"m3", mask=MASK))
    for i in range(4, 8):
        client.send(frame(OP_TEXT, b"m%d" % i, mask=MASK))
    relay.flush()
    assert [m for m, _ in server.messages] == [b"m0", b"m1", b"m2", b"m3"]
    assert closes(client) == [(1008, b"rate limit exceeded")]
    assert server.close == (1008, "rate limit exceeded")
    client.send(frame(OP_CLOSE, b"\x03\xf0", mask=MASK))  # the close handshake completes
    calm.send(frame(OP_TEXT, b"still here", mask=MASK))
    relay.flush()
    assert calm_server.messages == [(b"still here", False)]
    counters = relay.gateway.metrics.route("chat")
    assert counters.limit_rejections == {"ws_rate_limit": 1}
    assert ("gateway", "1008", "rate_limit") in counters.closes


def test_ws_rate_limit_counts_fragmented_messages_too():
    """Messages Autobahn reassembles (fragments) count against the rate like whole frames."""
    relay, client, server = open_pair("ws_rate_limit = 1\nws_rate_burst = 2", RecordingUpstream(echo=False))
    for i in range(3):
        client.send(frame(OP_TEXT, b"part-%d-" % i, fin=False, mask=MASK))
        client.send(frame(OP_CONTINUATION, b"end", mask=MASK))
    relay.flush()
    assert closes(client) == [(1008, b"rate limit exceeded")]
    assert [m for m, _ in server.messages] == [b"part-0-end", b"part-1-end"]


def test_frames_split_at_every_byte_pass_unchanged():
    """A burst of frames delivered one byte per read reaches the upstream message for message."""
    relay, client, server = open_pair()
    data = b"".join(frame(OP_TEXT, b"msg %d" % i, mask=MASK) for i in range(5))
    for i in range(len(data)):
        client.send(data[i : i + 1])
        relay.flush()
    assert [m for m, _ in server.messages] == [b"msg %d" % i for i in range(5)]


def test_a_binary_frame_split_across_reads_streams_through_with_the_clients_mask():
    """
    Each read of a large binary frame leaves at once as a fragment of the same
    message, its payload the bytes the client wrote (the key rotated by the
    fragment's offset), and the upstream gets the message whole.
    """
    relay, client, server = open_pair()
    raw: list[bytes] = []
    receive = server.dataReceived
    server.dataReceived = lambda data: raw.append(data) or receive(data)
    payload = bytes(range(256)) * 400
    data = frame(OP_BINARY, payload, mask=MASK)
    for read in [data[:20], data[20:1001], data[1001:50_003], data[50_003:]]:
        before = len(raw)
        client.send(read)
        relay.flush()
        assert len(raw) > before, "nothing was forwarded on this read"
    wire = b"".join(raw)
    fragments, rest = [], wire
    while rest:
        n = rest[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(n, 0)
        n = int.from_bytes(rest[2:start], "big") if start > 2 else n
        fragments.append((rest[0], rest[start : start + 4], rest[start + 4 : start + 4 + n]))
        rest = rest[start + 4 + n :]
    assert [b0 for b0, _, _ in fragments] == [0x02, 0x00, 0x00, 0x80]
    masked = data[14:]  # the client's bytes, as it masked them
    assert b"".join(p for _, _, p in fragments) == masked
    offset = 0
    for _, key, piece in fragments:
        assert key == MASK[offset % 4 :] + MASK[: offset % 4]
        offset += len(piece)
    assert server.messages == [(payload, True)]


def test_a_read_ending_inside_a_header_keeps_it_for_the_next_read():
    """Whole frames and then part of a header in one read (rate-limited routes too): nothing is garbled."""
    for extra in ("", "ws_rate_limit = 1000"):
        relay, client, server = open_pair(extra)
        data = frame(OP_TEXT, b"one", mask=MASK) + frame(OP_BINARY, b"two" * 50, mask=MASK) + frame(OP_TEXT, b"three", mask=MASK)
        for cut in (len(data) - 10, len(data) - 8, len(data) - 6):
            client.send(data[:cut])
            relay.flush()
            client.send(data[cut:])
            relay.flush()
        assert [m for m, _ in server.messages] == [b"one", b"two" * 50, b"three"] * 3


def test_ws_max_age_closes_both_legs_1001_within_its_jitter():
    """WebSockets older than ws_max_age ±10 % get 1001 "connection max age" on both legs."""
    relay, client, server = open_pair("ws_max_age = 100\nws_ping_interval = 0")
    other = relay.client("/v1/chat/ws?room=other")
    other_server = relay.upstream.connections[-1]
    relay.clock.advance(89.9)
    relay.flush()
    assert server.close is None and other_server.close is None
    relay.clock.advance(20.2)
    relay.flush()
    for c, s in ((client, server), (other, other_server)):
        assert closes(c) == [(1001, b"connection max age")]
        assert s.close == (1001, "connection max age")
        c.send(frame(OP_CLOSE, b"\x03\xe9", mask=MASK))
    relay.flush()
    counters = relay.gateway.metrics.route("chat")
    assert counters.closes == {("gateway", "1001", "max_age"): 2}
    assert_nothing_left(relay)


def test_ws_max_age_timer_ends_with_the_connection():
    relay, client, server = open_pair("ws_max_age = 100\nws_ping_interval = 0")
    client.send(frame(OP_CLOSE, b"\x03\xe8", mask=MASK))
    relay.flush()
    assert_nothing_left(relay)
    assert not [c for c in relay.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "close_both"]


def test_the_upstream_gets_the_request_target_as_written():
    """Path parameters and the query reach the upstream's request line byte for byte."""
    relay = MemoryRelay(config())
    relay.client("/v1/chat/a;b/ws;v=1?room=a&x=%20")
    relay.flush()
    (server,) = relay.upstream.connections
    assert server.http_request_uri == "/v1/chat/a;b/ws;v=1?room=a&x=%20"


def test_the_upstream_gets_a_repeated_client_header_once_joined_in_its_place():
    """Cookies joined with "; ", other repeated headers with ", ", each where it first came; UTF-8 byte for byte."""
    relay = MemoryRelay(config())
    relay.client("/v1/chat/ws", {"Cookie": "a=1\r\nX-Two: 1\r\nCookie: b=2\r\nX-Two: 2\r\nX-Text: caf\u00e9"})
    relay.flush()
    (server,) = relay.upstream.connections
    lines = server.http_request_data.split(b"\r\n")
    forwarded = [line for line in lines if line.split(b":")[0] in (b"Cookie", b"X-Two", b"X-Text")]
    assert forwarded == [b"Cookie: a=1; b=2", b"X-Two: 1, 2", b"X-Text: caf\xc3\xa9"]
    assert lines[-3:] == [b"Sec-WebSocket-Version: 13", b"", b""]


def test_an_authenticated_context_keeps_every_other_field():
    """HandshakeContext.authenticated is dataclasses.replace of its query and extra headers: every other field kept."""
    values = {field.name: object() for field in fields(HandshakeContext)}
    context = HandshakeContext(**values)
    authenticated = context.authenticated(b"room=a", [(b"x-user", b"u")])
    assert authenticated == replace(context, query=b"room=a", extra_headers=[(b"x-user", b"u")])
    assert type(authenticated) is HandshakeContext
    assert context == HandshakeContext(**values)  # the original unchanged


#: Two instances whose connects never complete (see the test below).
STALLED = """
[gateway]
ws_open_timeout = {open_timeout}
connect_timeout = 3
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:9 http://127.0.0.1:10
"""


@pytest.mark.parametrize(("open_timeout", "status", "at"), [(10, 502, 6.0), (5, 504, 5.0)])
def test_each_connect_is_timed_out_at_connect_timeout_and_the_handshake_at_ws_open_timeout(
    monkeypatch, open_timeout, status, at
):
    """
    An instance whose connect never completes is given connect_timeout (3 s),
    then the next is tried: with both stalled, the client gets 502 at 6 s
    ("cannot connect"), or 504 at ws_open_timeout when that comes first.
    """
    attempts: list[int] = []

    def connect(factory):
        attempts.append(factory.port)
        return Deferred(lambda d: d.errback(ConnectingCancelledError(None)))  # never connects

    monkeypatch.setattr(MemoryNetwork, "connector", lambda net, upstream: SimpleNamespace(connect=connect))
    relay = MemoryRelay(STALLED.format(open_timeout=open_timeout))
    client = relay.client("/v1/chat/ws")
    for advance, tried in ((2.9, 1), (0.2, 2), (at - 3.2, 2)):
        relay.clock.advance(advance)
        relay.flush()
        assert len(attempts) == tried and client.buffer == b""
    relay.clock.advance(0.2)
    relay.flush()
    assert sorted(attempts) == [9, 10]
    assert client.head.startswith(b"HTTP/1.1 %d " % status)
    if status == 502:
        assert b"cannot connect to the upstream" in client.buffer and b"timeout" in client.buffer
    assert_nothing_left(relay)
    assert not [c for c in relay.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_overdue"]


class _NeverAnswers(RecordingUpstreamProtocol):
    """An upstream that takes the connection and never answers the upgrade."""

    def processHandshake(self):
        pass


def test_an_upstream_that_never_answers_the_upgrade_is_504_at_ws_open_timeout():
    upstream = RecordingUpstream()
    upstream.protocol = _NeverAnswers
    relay = MemoryRelay(config(), upstream)  # ws_open_timeout = 5
    client = relay.client("/v1/chat/ws")
    relay.clock.advance(4.9)
    relay.flush()
    assert client.buffer == b""
    relay.clock.advance(0.2)
    relay.flush()
    assert client.head.startswith(b"HTTP/1.1 504 ")
    assert_nothing_left(relay)


def test_each_websocket_gets_an_id_of_its_own_and_a_forked_child_draws_its_own():
    """16 random hex digits, as os.urandom(8).hex() makes them; drawn ahead, never shared with a forked worker."""
    ids = [ws_pair.new_session_id() for _ in range(3 * ws_pair.RANDOM_AT_ONCE // 8 + 1)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert len(ws_pair.random_bytes(16)) == 16 and len(ws_pair.random_bytes(2 * ws_pair.RANDOM_AT_ONCE)) == 2048
    ws_pair.random_bytes(1)  # a new draw, most of it not given yet
    pid = os.fork()
    if pid == 0:
        os._exit(1 if ws_pair._random else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
