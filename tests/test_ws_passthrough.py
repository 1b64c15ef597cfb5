"""The fast path's frame rules, as plain functions (the relay itself: test_relay_memory, test_relay_differential)."""

from __future__ import annotations

import codecs

import pytest
from twisted.internet.testing import StringTransport

from twisted_gateway._compat import write_pieces
from twisted_gateway.testing import parse_frames
from twisted_gateway.ws_passthrough import _wanted, fragment_header, rotate, unmask, utf8_so_far


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 1 << 20])
@pytest.mark.parametrize("key", [None, b"\x01\x02\x03\x04"])
def test_fragment_header_is_the_minimal_encoding(length, key):
    """A header read back gives the opcode, FIN, length and key it was built with."""
    head = fragment_header(2, True, length, key)
    payload = bytes(length)
    frames, rest = parse_frames(head + (payload if key is None else unmask(payload, key)))
    assert frames == [(2, True, payload)] and rest == b""
    assert len(head) == 2 + (0 if length < 126 else 2 if length < 65536 else 8) + (4 if key else 0)


@pytest.mark.parametrize("offset", range(9))
def test_a_rotated_key_unmasks_a_fragment_as_the_whole_key_would(offset):
    key, payload = b"\x0f\x1e\x2d\x3c", bytes(range(40))
    masked = unmask(payload, key)
    assert unmask(masked[offset:], rotate(key, offset)) == payload[offset:]


@pytest.mark.parametrize(
    "start, wanted",
    [
        (b"\x82", 2),
        (b"\x82\x05", 2),
        (b"\x82\x85", 6),
        (b"\x82\xfe", 8),
        (b"\x81\x7f", 10),
        (b"\x81\xff", 14),
        (b"\x89\x84", 10),  # a whole ping: header, key, payload
        (b"\x88\x02", 4),
        (b"\x89\x7e", 2),  # a control frame too long: Autobahn refuses it on two bytes
        (b"\x01\x05", 2),  # a fragment: Autobahn's
        (b"\xc2\x05", 2),  # RSV bits: Autobahn refuses it on two bytes
    ],
)
def test_bytes_wanted_before_deciding(start, wanted):
    assert _wanted(start) == wanted


@pytest.mark.parametrize(
    "pieces, ok",
    [
        ([b"caf\xc3", b"\xa9"], True),  # a character split between pieces
        ([b"caf\xc3"], True),  # not final yet
        ([b"ab\xed\xa0"], False),  # a surrogate: refused before its last byte comes
        ([b"ab\xf4\x90"], False),  # above U+10FFFF
        ([b"ok", b"\xff"], False),
        ([b"\xe0\x80"], False),  # overlong
    ],
)
def test_utf8_is_judged_as_soon_as_autobahn_would(pieces, ok):
    decoder = codecs.getincrementaldecoder("utf-8")()
    assert all(utf8_so_far(decoder, piece, False) for piece in pieces) is ok


def test_utf8_ending_inside_a_character_is_refused_at_the_end():
    decoder = codecs.getincrementaldecoder("utf-8")()
    assert utf8_so_far(decoder, b"caf\xc3", False)
    assert not utf8_so_far(decoder, b"", True)


def test_write_pieces_keeps_twisteds_path_for_other_transports():
    """Views and bytes, written in order, through a transport that is not a plain TCP socket."""
    transport = StringTransport()
    read = b"0123456789"
    write_pieces(transport, [b"<", memoryview(read)[2:5], memoryview(read), b">"])
    write_pieces(transport, [memoryview(read)[7:]])
    assert transport.value() == b"<2340123456789>789"
