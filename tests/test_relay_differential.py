"""
The relay's fast path (data frames passed as bytes, ws_passthrough) and
Autobahn's own parsing agree: random frame sequences, valid and not (every
opcode, RSV bits, masked or not, every length encoding, text with bad UTF-8,
fragments, pings between fragments, messages over the size limit), cut into
reads at random points and fed to a relay pair in memory, give each peer the
same messages, control frames and close codes, with the fast path on and off.

What a peer can observe is compared: the messages it receives whole, the
control frames, and where they come. A binary frame split across reads leaves
the fast path as fragments of the same message (RFC 6455 5.4), which Autobahn
would have sent whole or fragmented differently, so when a frame is split the
frames are compared as messages; when every read ends on a frame boundary the
bytes must be the same too.

A few hundred examples run in ``make test`` (``DIFF_EXAMPLES`` per property, 150
by default: half the time goes to drawing them); ``make fuzz`` runs the long one
(``HYPOTHESIS_PROFILE=fuzz``, ``FUZZ_EXAMPLES`` examples).
"""

from __future__ import annotations

import os

import pytest

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twisted_gateway.testing import MemoryRelay, RecordingUpstream, parse_frames

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("DIFF_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,  # the same examples on every make test; make fuzz explores
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

LIMIT = 1000
CONFIG = f"""
[gateway]
ws_open_timeout = 5
ws_ping_interval = 0
ws_max_message_size = {LIMIT}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:9
"""

OPCODES = [0, 1, 2, 3, 7, 8, 9, 10, 11, 15]


def encode(opcode: int, payload: bytes, fin: bool, rsv: int, mask: bytes | None, length_form: int) -> bytes:
    """A frame with its length written in form 0 (minimal), 1 (16 bits) or 2 (64 bits)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask is not None else 0
    if length_form == 0 and n < 126:
        head += bytes([bit | n])
    elif length_form <= 1 and n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


#: Mask keys: any, and keys of four different bytes (a fragment's key rotated wrong shows).
keys = st.one_of(st.binary(min_size=4, max_size=4), st.permutations(b"\x13\x57\x9b\xdf").map(bytes))


def text_payload() -> st.SearchStrategy[bytes]:
    """UTF-8 text, sometimes with a bad byte inserted anywhere (splitting a character too)."""
    good = st.text(alphabet=st.characters(codec="utf-8"), max_size=40).map(lambda t: t.encode("utf-8"))

    def spoil(data: bytes, where: int, bad: bytes) -> bytes:
        i = where % (len(data) + 1)
        return data[:i] + bad + data[i:]

    bad = st.builds(spoil, good, st.integers(0, 200), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf4\x90"]))
    return st.one_of(good, good, bad)


@st.composite
def frames(draw, masked_side: bool) -> bytes:
    opcode = draw(st.sampled_from([1, 1, 1, 2, 2, 0, 9, 10, 8] + OPCODES))
    if opcode in (1, 0):
        payload = draw(text_payload())
    elif opcode == 8:
        payload = draw(st.sampled_from([b"", b"\x03\xe8", b"\x03\xe8bye", b"\x0f\xa0", b"\x03\xe7", b"\x03\xe8\xff"]))
    else:
        size = draw(st.sampled_from([0, 1, 5, 125, 126, 300, LIMIT, LIMIT + 1]))
        payload = draw(st.binary(min_size=size, max_size=size)) if size < 200 else bytes(size)
    if opcode in (1, 0) and draw(st.integers(0, 9)) == 0:
        payload = payload * (LIMIT // max(len(payload), 1) + 1)  # over the limit
    fin = draw(st.sampled_from([True, True, True, False]))
    rsv = draw(st.sampled_from([0] * 12 + [1, 2, 4, 7]))
    masked = masked_side if draw(st.integers(0, 15)) else not masked_side
    mask = draw(keys) if masked else None
    length_form = draw(st.sampled_from([0] * 10 + [1, 2]))
    return encode(opcode, payload, fin, rsv, mask, length_form)


@st.composite
def good_frames(draw, masked_side: bool) -> tuple[bytes, bool]:
    """A text or binary frame for the fast path (text sometimes with a bad byte), and whether it is valid."""
    opcode = draw(st.sampled_from([1, 2]))
    if opcode == 1:
        payload = draw(text_payload())
    else:
        size = draw(st.sampled_from([0, 1, 5, 125, 126, 300, LIMIT]))
        payload = draw(st.binary(min_size=size, max_size=size)) if size < 200 else bytes(size)
    mask = draw(keys) if masked_side else None
    return encode(opcode, payload, True, 0, mask, 0), opcode == 2 or _utf8(payload)


def _utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def cut(draw, side: str, parts: list[bytes], inside: bool) -> tuple[str, list[bytes], bool]:
    """
    ``parts`` (frames) cut into reads at random points (``inside``: most
    frames of more than one byte cut at least once), now and then stopping short
    (a sender that stalls mid-frame); also whether every read ends on a frame
    boundary.
    """
    data = b"".join(parts)
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(1, len(data)))]
    cuts = set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=8)))
    edges, at = [0], 0
    for part in parts:
        at += len(part)
        edges.append(at)
    if inside:
        for a, b in zip(edges, edges[1:]):
            if b - a > 1 and draw(st.integers(0, 3)):
                cuts.add(draw(st.integers(a + 1, b - 1)))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    whole = set(bounds) <= set(edges)
    return side, [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a], whole


@st.composite
def traffic(draw) -> tuple[str, list[bytes], bool, bool]:
    """Who sends (the client or the upstream), its bytes cut into reads, whether whole; and whether under ws_rate_limit."""
    side = draw(st.sampled_from(["client", "upstream"]))
    return (*cut(draw, side, draw(st.lists(frames(side == "client"), min_size=1, max_size=8)), inside=False), draw(st.booleans()))


@st.composite
def split_traffic(draw) -> tuple[tuple[str, list[bytes], bool, bool], bool]:
    """
    Frames for the fast path, each split across reads, now and then a ping or
    a close between them; and whether all of them are the fast path's (valid,
    no close).
    """
    side = draw(st.sampled_from(["client", "upstream"]))
    mask = b"abcd" if side == "client" else None
    ping = (encode(9, b"ping", True, 0, mask, 0), True)
    close = (encode(8, b"\x03\xe8bye", True, 0, mask, 0), False)
    good = good_frames(side == "client")
    parts = draw(st.lists(st.one_of(good, good, good, st.sampled_from([ping, close])), min_size=1, max_size=6))
    reads = (*cut(draw, side, [part for part, _ in parts], inside=True), draw(st.booleans()))
    return reads, all(taken for _, taken in parts)


def observed(frames: list[tuple[int, bool, bytes]]) -> list[tuple]:
    """
    What a peer's WebSocket makes of ``frames``: each message once its last
    fragment is in, each control frame as it comes; a message cut short is
    never delivered.
    """
    events: list[tuple] = []
    message: list | None = None
    for opcode, fin, payload in frames:
        if opcode >= 8:
            events.append(("control", opcode, payload))
            continue
        if opcode == 0 and message is not None:
            message[1] += payload
        else:
            message = [opcode, payload]
        if fin:
            events.append(("message", *message))
            message = None
    return events


def as_observed(outcome: dict) -> dict:
    """An outcome with the bytes each peer got read as messages and control frames."""
    seen = dict(outcome)
    to_client, rest = parse_frames(outcome["to_client"])
    seen["to_client"] = (observed(to_client), len(rest))
    to_upstream, rest = outcome["to_upstream"]
    seen["to_upstream"] = (observed(to_upstream), rest)
    return seen


#: A ws_rate_limit never reached: every read then goes through the fast path's general loop.
RATED = CONFIG.replace("[gateway]\n", "[gateway]\nws_rate_limit = 1000000\n")


def relay_outcome(side: str, reads: list[bytes], fast: bool, rated: bool = False):
    """What leaves the relay for each peer when ``reads`` come from ``side`` (``rated``: under ws_rate_limit)."""
    upstream = RecordingUpstream(echo=False)
    relay = MemoryRelay(RATED if rated else CONFIG, upstream)
    client = relay.client("/v1/chat/ws")
    server = upstream.connections[-1]
    received: list[bytes] = []
    feed = server.dataReceived

    def record(data: bytes) -> None:
        received.append(data)
        feed(data)

    server.dataReceived = record
    (pair,) = relay.registry.pairs
    assert all(leg.passthrough for leg in pair.legs())  # the fast path is on by default
    if not fast:
        for leg in pair.legs():
            leg.passthrough = False
    leg = pair.client if side == "client" else pair.upstream
    begun = []
    begin = leg.onMessageBegin
    leg.onMessageBegin = lambda binary: begun.append(binary) or begin(binary)
    sender = client.transport if side == "client" else server.transport
    for data in reads:
        sender.write(data)
        relay.flush()
    relay.clock.advance(10)  # close handshakes time out the same way
    relay.flush()
    to_client = client.buffer.split(b"\r\n\r\n", 1)[1]
    to_upstream, rest = parse_frames(b"".join(received))  # masks differ: compared unmasked
    outcome = {
        "to_client": to_client,
        "to_upstream": (to_upstream, len(rest)),
        "upstream_messages": server.messages,
        "upstream_close": (server.close_received, server.close),
        "client_closed": client.closed,
        "pairs": len(relay.registry.pairs),
        "closes": dict(relay.gateway.metrics.route("chat").closes),
        "autobahn_messages": len(begun),
    }
    # whatever is still connected goes, with its Autobahn timers (on the global reactor)
    for transport in (client.transport, server.transport):
        transport.loseConnection()
    relay.flush()
    return outcome


def agree(side: str, reads: list[bytes], whole: bool, rated: bool = False) -> dict:
    """Both ways give each peer the same (the same bytes when no frame was split); the fast one."""
    fast, slow = relay_outcome(side, reads, True, rated), relay_outcome(side, reads, False, rated)
    taken = fast.pop("autobahn_messages"), slow.pop("autobahn_messages")
    assert as_observed(fast) == as_observed(slow)
    if whole:
        assert fast == slow
    return {**fast, "autobahn_messages": taken[0]}


@given(traffic())
# A read with the end of a frame begun earlier, a whole frame, and the first byte of the next:
# that byte is kept for the next read, not sent with the whole frame.
@example(("client", [b"\x81", b"\x87\0\0\0\0" + b"0" * 7 + b"\x81\x91\0\0\0\0" + b"1" * 17 + b"\x88", b"\x80\0\0\0\0"], False, False))
def test_fast_path_and_autobahn_agree(case):
    agree(*case)


@given(split_traffic())
def test_split_frames_take_the_fast_path_and_agree(case):
    """Frames split across reads, bad UTF-8 split anywhere included, take the fast path and agree."""
    reads, all_fast = case
    outcome = agree(*reads)
    if all_fast:
        assert outcome["autobahn_messages"] == 0  # Autobahn's parser began no message


def test_the_fast_path_is_taken():
    """
    The comparison means something: a whole frame reaches the upstream with
    no message begun by Autobahn's parser, which begins one with the fast path off.
    """
    reads = [encode(1, b"hello", True, 0, b"abcd", 0)]
    fast, slow = relay_outcome("client", reads, True), relay_outcome("client", reads, False)
    assert fast["upstream_messages"] == slow["upstream_messages"] == [(b"hello", False)]
    assert (fast["autobahn_messages"], slow["autobahn_messages"]) == (0, 1)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf4\x90", b"\xe0\x80"])
@pytest.mark.parametrize("side", ["client", "upstream"])
def test_bad_utf8_split_at_every_byte_agrees(side, bad):
    """A text frame with a bad sequence, cut at every byte, with the rest sent or never sent."""
    mask = b"\x01\x02\x03\x04" if side == "client" else None
    data = encode(1, "h\u00e9".encode() + bad + b"!", True, 0, mask, 0) + encode(2, b"after", True, 0, mask, 0)
    for at in range(1, len(data)):
        agree(side, [data[:at], data[at:]], whole=False)
        agree(side, [data[:at]], whole=False)
