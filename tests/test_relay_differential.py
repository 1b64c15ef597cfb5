"""
The relay's fast path (whole data frames passed as bytes, ws_relay._pass_frames)
and Autobahn's own parsing agree: random frame sequences, valid and not (every
opcode, RSV bits, masked or not, every length encoding, text with bad UTF-8,
fragments, pings between fragments, messages over the size limit), cut into
reads at random points and fed to a relay pair in memory, give the same bytes
to the client, the same messages and close frames to the upstream, and the same
close codes, with the fast path on and off.

A few hundred examples run in ``make test``; ``make fuzz`` runs the long one
(``HYPOTHESIS_PROFILE=fuzz``, ``FUZZ_EXAMPLES`` examples).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted_gateway.testing import MemoryRelay, RecordingUpstream, parse_frames

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("DIFF_EXAMPLES", "300")),
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
    mask = draw(st.binary(min_size=4, max_size=4)) if masked else None
    length_form = draw(st.sampled_from([0] * 10 + [1, 2]))
    return encode(opcode, payload, fin, rsv, mask, length_form)


@st.composite
def traffic(draw) -> tuple[str, list[bytes]]:
    """Who sends (the client or the upstream), and its bytes cut into reads."""
    side = draw(st.sampled_from(["client", "upstream"]))
    data = b"".join(draw(st.lists(frames(side == "client"), min_size=1, max_size=8)))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=8))))
    bounds = [0, *(c for c in cuts if c < len(data)), len(data)]
    return side, [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def relay_outcome(side: str, reads: list[bytes], fast: bool):
    """What leaves the relay for each peer when ``reads`` come from ``side``."""
    upstream = RecordingUpstream(echo=False)
    relay = MemoryRelay(CONFIG, upstream)
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
        "closes": dict(relay.resource.metrics.route("chat").closes),
    }
    # whatever is still connected goes, with its Autobahn timers (on the global reactor)
    for transport in (client.transport, server.transport):
        transport.loseConnection()
    relay.flush()
    return outcome


@given(traffic())
def test_fast_path_and_autobahn_agree(case):
    side, reads = case
    assert relay_outcome(side, reads, fast=True) == relay_outcome(side, reads, fast=False)


def test_the_fast_path_is_taken():
    """The comparison means something: whole frames do take the fast path."""
    reads = [encode(1, b"hello", True, 0, b"abcd", 0)]
    relay = MemoryRelay(CONFIG, RecordingUpstream(echo=False))
    client = relay.client("/v1/chat/ws")
    (pair,) = relay.registry.pairs
    taken = []
    leg = pair.client
    original = leg._pass_frames
    leg._pass_frames = lambda data: taken.append(data) or original(data)
    client.transport.write(reads[0])
    relay.flush()
    assert taken and relay.upstream.connections[-1].messages == [(b"hello", False)]
